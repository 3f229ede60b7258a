"""``pdserve gateway``: the OpenAI endpoint and the global scheduler, in one process."""

from __future__ import annotations

import uvicorn

from pdserve.gateway.app import create_app
from pdserve.gateway.settings import GatewaySettings
from pdserve.logs import get_logger
from pdserve.protocol.net import is_loopback
from pdserve.protocol.wire import cluster_secret
from pdserve.scheduler.dispatch import DispatchSettings
from pdserve.scheduler.rescheduling import ReschedulingSettings

logger = get_logger(__name__)


def serve(
    settings: GatewaySettings, dispatch: DispatchSettings, rescheduling: ReschedulingSettings
) -> int:
    loopback = is_loopback(settings.host) and is_loopback(settings.control_host)
    try:
        secret = cluster_secret(loopback_only=loopback)
    except RuntimeError as e:
        print(f"pdserve gateway: {e}")
        return 2
    app = create_app(settings, dispatch, secret, rescheduling)
    logger.info(
        "pdserve: gateway on http://%s:%d (policy %s), instances join at tcp://%s:%d",
        settings.host,
        settings.port,
        dispatch.policy,
        settings.control_host,
        settings.control_port,
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=30,
    )
    return 0
