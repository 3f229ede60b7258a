"""A KV worker tells the gateway what it holds, itself, whenever that changes.

Load reports are built after engine steps, and an idle engine takes none: a pull that ended
after the last step would look in flight forever. So each worker pushes its ``KVHoldings``
(exports, pairs, transfers running) straight to the gateway's control plane, at most once
per report interval when they change and once a second anyway.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from pdserve.kv.settings import KVSettings
from pdserve.logs import get_logger
from pdserve.protocol.reports import ControlMessage, HoldingsReport, KVHoldings
from pdserve.protocol.wire import Codec

logger = get_logger(__name__)

RESEND_EVERY_S = 1.0


class HoldingsReporter:
    """A daemon thread of the worker process; ``stop`` ends it (at shutdown)."""

    def __init__(
        self, settings: KVSettings, rank: int, read: Callable[[], KVHoldings], secret: bytes
    ) -> None:
        assert settings.control_address is not None
        self._settings = settings
        self._rank = rank
        self._read = read
        self._codec: Codec[Any] = Codec(ControlMessage, secret)
        self._socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 4)  # a stale gauge is worthless: drop, not queue
        self._socket.connect(settings.control_address)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-kv-holdings", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sent: KVHoldings | None = None
        sent_at = 0.0
        while not self._stopped.wait(self._settings.report_interval_s):
            try:
                holdings = self._read()
                now = time.monotonic()
                if holdings == sent and now - sent_at < RESEND_EVERY_S:
                    continue
                report = HoldingsReport(
                    instance_id=self._settings.instance_id,
                    rank=self._rank,
                    incarnation=self._settings.incarnation,
                    holdings=holdings,
                )
                self._socket.send_multipart(self._codec.encode(report), flags=zmq.NOBLOCK)
                sent, sent_at = holdings, now
            except zmq.Again:
                pass  # the gateway is away; the next round sends again
            except Exception:
                logger.exception("pdserve kv: sending holdings failed")

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=2)
        self._socket.close(linger=0)
