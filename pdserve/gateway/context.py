"""What every request handler of the gateway shares: its services and admission control.

The gateway's modules import in one direction: services (``control_plane``, ``upstream``,
``kv_client``, ``metrics``) → this context → ``session`` (one client request, and the
registry of live sessions) → ``migration`` (moves sessions) → ``app`` (wires them together).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pdserve.gateway.control_plane import ControlPlane
from pdserve.gateway.errors import APIError
from pdserve.gateway.kv_client import KVControlClient
from pdserve.gateway.metrics import GatewayMetrics
from pdserve.gateway.settings import GatewaySettings
from pdserve.gateway.upstream import Upstream


class Admission:
    """At most ``max_inflight`` requests at once, ``max_queued`` more waiting, others 429."""

    def __init__(self, max_inflight: int, max_queued: int) -> None:
        self._slots = asyncio.Semaphore(max_inflight)
        self.max_queued = max_queued
        self.inflight = 0
        self.queued = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked() and self.queued >= self.max_queued:
            raise APIError(
                429, "the cluster is at capacity; retry shortly", headers={"Retry-After": "1"}
            )
        self.queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.queued -= 1
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1
            self._slots.release()


class GatewayContext:
    def __init__(
        self,
        settings: GatewaySettings,
        control: ControlPlane,
        upstream: Upstream,
        kv: KVControlClient,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.control = control
        self.upstream = upstream
        self.kv = kv
        self.metrics = metrics
        self.admission = Admission(settings.max_inflight, settings.max_queued)

    def default_model(self) -> str:
        models = self.control.models()
        return next(iter(models), "default")
