"""The gateway's side of KV control: telling exporters that nobody will pull their blocks.

When a disaggregated request ends before (or without) its decode instance pulling the
prefill's KV (the client left, the decode instance failed), the gateway sends ``Release`` to
every TP rank of the exporter, so the blocks are freed at once instead of at lease expiry.
"""

from __future__ import annotations

from typing import Any

import zmq
import zmq.asyncio

from pdserve.kv.messages import KVMessage, Release
from pdserve.logs import get_logger
from pdserve.wire import Codec

logger = get_logger(__name__)


class KVControlClient:
    def __init__(self, secret: bytes) -> None:
        self._codec: Codec[Any] = Codec(KVMessage, secret)
        self._ctx = zmq.asyncio.Context.instance()
        self._sockets: dict[str, zmq.asyncio.Socket] = {}

    def _socket(self, address: str) -> zmq.asyncio.Socket:
        sock = self._sockets.get(address)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 1000)
            sock.connect(address)
            self._sockets[address] = sock
        return sock

    def release(self, addresses: list[str], transfer_id: str) -> None:
        frames = self._codec.encode(Release(transfer_id=transfer_id))
        for address in addresses:
            try:
                self._socket(address).send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.ZMQError as e:
                logger.warning("pdserve: could not release %s at %s: %s", transfer_id, address, e)

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets.clear()
