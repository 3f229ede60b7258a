"""A thread that pushes the latest control message to the gateway every interval.

Load reports (from the engine) and KV holdings (from each worker) are gauges: a report that
cannot go now is worth nothing later. So the socket keeps at most a few queued, a full queue
drops the message, and the next interval sends a fresh one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import zmq

from pdserve.logs import get_logger
from pdserve.protocol.reports import ControlMessage
from pdserve.protocol.wire import Codec

logger = get_logger(__name__)


class PeriodicPusher:
    """Every ``interval_s``, sends ``make()`` to ``address`` unless it returns None."""

    def __init__(
        self,
        address: str,
        secret: bytes,
        interval_s: float,
        make: Callable[[], Any | None],
        name: str,
    ) -> None:
        self._make = make
        self._interval = interval_s
        self._codec: Codec[Any] = Codec(ControlMessage, secret)
        self._socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 4)  # stale gauges are worthless: drop, not queue
        self._socket.connect(address)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                message = self._make()
                if message is not None:
                    self._socket.send_multipart(self._codec.encode(message), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass  # the gateway is away; the next interval sends a fresh one
            except Exception:
                logger.exception("pdserve: sending to the control plane failed")

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=2)
        self._socket.close(linger=0)
