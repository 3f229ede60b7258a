"""The gateway's side of KV control: releases to KV servers, commands to engines.

- ``release``: when a disaggregated request ends before (or without) its decode instance
  pulling the prefill's KV, the exporter is told at once, instead of waiting for the lease.
- ``call``: request/response with an instance's engine control server (``Pin``/``Unpin`` of
  a running request, for migration).

Every message carries the cluster secret's MAC (``pdserve.protocol.wire``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from pdserve.kv.messages import KVMessage, Release
from pdserve.logs import get_logger
from pdserve.protocol.wire import AuthError, Codec

logger = get_logger(__name__)


class KVControlClient:
    def __init__(self, secret: bytes) -> None:
        self._codec: Codec[Any] = Codec(KVMessage, secret)
        self._ctx = zmq.asyncio.Context.instance()
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._rids = itertools.count(1)

    def _socket(self, address: str) -> zmq.asyncio.Socket:
        sock = self._sockets.get(address)
        if sock is None:
            # Like the KV messenger's DEALERs (pdserve/kv/messenger.py), but on an asyncio
            # context: the two share four setsockopt lines and no code that would help.
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

    async def call(self, address: str, make: Callable[[int], Any], timeout_s: float) -> Any:
        """Sends ``make(rid)`` and waits for the reply carrying that rid."""
        sock = self._socket(address)
        if address not in self._readers:
            self._readers[address] = asyncio.create_task(self._read(address, sock))
        rid = next(self._rids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        try:
            await sock.send_multipart(self._codec.encode(make(rid)))
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._waiting.pop(rid, None)

    async def _read(self, address: str, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                message = self._codec.decode(frames)
            except AuthError as e:
                logger.warning("pdserve: refused a reply from %s: %s", address, e)
                continue
            future = self._waiting.get(getattr(message, "rid", -1))
            if future is not None and not future.done():
                future.set_result(message)

    def close(self) -> None:
        for task in self._readers.values():
            task.cancel()
        for sock in self._sockets.values():
            with contextlib.suppress(zmq.ZMQError):
                sock.close(linger=0)
        self._sockets.clear()
        self._readers.clear()
