"""Point-to-point transport between workers: authenticated ZeroMQ control, torch.distributed data.

Pieces, bottom up:

- ``Messenger``: one thread owns every ZeroMQ socket of a worker (a ROUTER for peers'
  requests, one DEALER per peer it calls); other threads hand it frames through a queue.
- ``PairStore``: the rendezvous store of a process group of two, mirrored to the other member
  over the messenger, so no unauthenticated TCPStore port is ever opened.
- ``Pair``: that process group (gloo for CPU caches, NCCL for CUDA caches), created on demand
  when two workers first exchange KV, so instances can join at any time and no world size is
  fixed. Its set-up cost is paid once per pair and logged.
- ``post_transfer``: one send or receive per (plane, run of consecutive blocks), straight from
  and into the KV cache: no staging copy on either side.

If a transfer stalls, the pair is aborted before anything else happens: gloo then drops the
pending receives, so no late write can land in blocks that were given back to vLLM.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
import zmq

from pdserve.kv.messages import KVMessage, StoreSet
from pdserve.logs import get_logger
from pdserve.protocol.wire import AuthError, Codec

logger = get_logger(__name__)

MESSAGES_PER_TRANSFER = 1 << 16

RequestHandler = Callable[[bytes, Any], None]


class Messenger:
    """Owns the ZeroMQ sockets of one worker; thread-safe through its outbox."""

    def __init__(
        self,
        codec: Codec[Any],
        bind_address: str | None,
        on_request: RequestHandler,
        on_store_set: Callable[[StoreSet], None],
        name: str = "pdserve-kv-messenger",
    ) -> None:
        self._codec = codec
        self._on_request = on_request
        self._on_store_set = on_store_set
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._router: zmq.Socket | None = None
        if bind_address:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self._router.bind(bind_address)
        self._dealers: dict[str, zmq.Socket] = {}
        self._outbox: queue.SimpleQueue[tuple[str, Any, list[bytes]]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._mailboxes: dict[int, queue.SimpleQueue[Any]] = {}
        self._mailbox_lock = threading.Lock()
        self._rids = itertools.count(1)
        self._stopped = threading.Event()
        self._debug = logger.isEnabledFor(logging.DEBUG)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- API for other threads -------------------------------------------------------------

    def new_request(self) -> tuple[int, queue.SimpleQueue[Any]]:
        """A request id and the mailbox where replies carrying it will arrive."""
        rid = next(self._rids)
        box: queue.SimpleQueue[Any] = queue.SimpleQueue()
        with self._mailbox_lock:
            self._mailboxes[rid] = box
        return rid, box

    def forget(self, rid: int) -> None:
        with self._mailbox_lock:
            self._mailboxes.pop(rid, None)

    def send(self, address: str, message: Any) -> None:
        """Sends to the ROUTER of the peer at ``address`` (tcp://host:port)."""
        self._enqueue("dealer", address, message)

    def reply(self, identity: bytes, message: Any) -> None:
        """Sends back to a peer that sent us a request on our ROUTER."""
        self._enqueue("router", identity, message)

    def drop_peer(self, address: str) -> None:
        """Discards what is queued for an unresponsive peer; the next send reconnects."""
        self._enqueue("drop", address, None)

    def stop(self) -> None:
        self._stopped.set()
        self._wake()
        self._thread.join(timeout=5)

    # --- the I/O thread --------------------------------------------------------------------

    def _enqueue(self, kind: str, target: Any, message: Any) -> None:
        frames = self._codec.encode(message) if message is not None else []
        self._outbox.put((kind, target, frames))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _dealer(self, address: str) -> zmq.Socket:
        sock = self._dealers.get(address)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 10000)
            sock.connect(address)
            self._dealers[address] = sock
            self._poller.register(sock, zmq.POLLIN)
        return sock

    def _flush_outbox(self) -> None:
        while True:
            try:
                kind, target, frames = self._outbox.get_nowait()
            except queue.Empty:
                return
            if self._debug and kind != "drop":
                logger.debug("pdserve kv: -> %s %s", kind, target)
            try:
                if kind == "dealer":
                    self._dealer(target).send_multipart(frames, flags=zmq.NOBLOCK)
                elif kind == "router" and self._router is not None:
                    self._router.send_multipart([target, *frames], flags=zmq.NOBLOCK)
                elif kind == "drop" and target in self._dealers:
                    sock = self._dealers.pop(target)
                    self._poller.unregister(sock)
                    sock.close(linger=0)
            except zmq.ZMQError as e:
                logger.warning("pdserve kv: could not send to %r: %s", target, e)

    def _deliver(self, message: Any, identity: bytes | None) -> None:
        if self._debug:
            logger.debug("pdserve kv: <- %s %s", type(message).__name__, identity)
        if isinstance(message, StoreSet):
            self._on_store_set(message)
            return
        rid = getattr(message, "rid", None)
        if identity is None:
            # A reply on one of our DEALERs.
            with self._mailbox_lock:
                box = self._mailboxes.get(rid) if rid is not None else None
            if box is not None:
                box.put(message)
            return
        try:
            self._on_request(identity, message)
        except Exception:  # a handler bug must not kill the I/O thread
            logger.exception("pdserve kv: handler failed for %s", type(message).__name__)

    def _decode(self, frames: list[bytes]) -> Any | None:
        try:
            return self._codec.decode(frames)
        except AuthError as e:
            logger.warning("pdserve kv: refused a message: %s", e)
            return None

    def _run(self) -> None:
        self._poller = zmq.Poller()
        if self._router is not None:
            self._poller.register(self._router, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        while not self._stopped.is_set():
            events = dict(self._poller.poll(1000))
            if self._wake_r in events:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            self._flush_outbox()
            for sock, _ in events.items():
                if sock is self._wake_r:
                    continue
                assert isinstance(sock, zmq.Socket)
                while True:
                    try:
                        frames = sock.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if sock is self._router:
                        identity, body = frames[0], frames[1:]
                        message = self._decode(body)
                        if message is not None:
                            self._deliver(message, identity)
                    else:
                        message = self._decode(frames)
                        if message is not None:
                            self._deliver(message, None)
        for sock in [*self._dealers.values(), self._router]:
            if sock is not None:
                sock.close(linger=0)
        os.close(self._wake_r)
        os.close(self._wake_w)


class PairStore(dist.Store):
    """A rendezvous store for two processes, kept in sync over the authenticated channel.

    torch.distributed process groups rendezvous through a key-value store; a TCPStore would
    open a port anyone can write to. Here each ``set`` is applied locally and mirrored to the
    other member, and ``get`` waits until the key has arrived.
    """

    def __init__(self, pair_id: str, mirror: Callable[[StoreSet], None], timeout_s: float):
        super().__init__()
        self.pair_id = pair_id
        self._mirror = mirror
        self._timeout_s = timeout_s
        self._data: dict[str, bytes] = {}
        self._changed = threading.Condition()

    def receive(self, message: StoreSet) -> None:
        with self._changed:
            self._data[message.key] = message.value
            self._changed.notify_all()

    def set(self, key: str, value: Any) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        with self._changed:
            self._data[key] = data
            self._changed.notify_all()
        self._mirror(StoreSet(pair_id=self.pair_id, key=key, value=data))

    def _wait_for(self, keys: Iterable[str], timeout_s: float) -> None:
        keys = list(keys)
        with self._changed:
            ok = self._changed.wait_for(lambda: all(k in self._data for k in keys), timeout_s)
        if not ok:
            raise TimeoutError(f"pair {self.pair_id}: peer never set {keys}")

    def get(self, key: str) -> bytes:
        self._wait_for([key], self._timeout_s)
        return self._data[key]

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._wait_for(keys, timeout.total_seconds() if timeout else self._timeout_s)

    def check(self, keys: list[str]) -> bool:
        with self._changed:
            return all(k in self._data for k in keys)

    def add(self, key: str, amount: int) -> int:
        # Used by some backends for counters; both members only add to their own keys.
        with self._changed:
            value = int(self._data.get(key, b"0")) + amount
            self._data[key] = str(value).encode()
        self._mirror(StoreSet(pair_id=self.pair_id, key=key, value=str(value).encode()))
        return value

    def num_keys(self) -> int:
        return len(self._data)

    def delete_key(self, key: str) -> bool:
        with self._changed:
            return self._data.pop(key, None) is not None


def backend_for(device: torch.device, requested: str) -> Literal["gloo", "nccl"]:
    if requested in ("gloo", "nccl"):
        return requested  # type: ignore[return-value]
    return "nccl" if device.type == "cuda" else "gloo"


class Pair:
    """A process group of two workers; rank 0 is the side that serves pulls."""

    def __init__(
        self,
        pair_id: str,
        rank: int,
        backend: Literal["gloo", "nccl"],
        host: str,
        timeout_s: float,
        mirror: Callable[[StoreSet], None],
    ) -> None:
        self.pair_id = pair_id
        self.rank = rank
        self.peer_rank = 1 - rank
        self.backend = backend
        self.store = PairStore(pair_id, mirror, timeout_s)
        self._host = host
        self._timeout_s = timeout_s
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.error: str | None = None
        self.pg: Any = None
        self.setup_s = 0.0
        self.broken = False
        self._seq = itertools.count()

    def next_seq(self) -> int:
        return next(self._seq)

    def establish(self) -> None:
        """Blocks until both members have joined (or the store times out)."""
        start = time.perf_counter()
        try:
            timeout = timedelta(seconds=self._timeout_s)
            if self.backend == "gloo":
                options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
                options._devices = [dist.ProcessGroupGloo.create_device(hostname=self._host)]
                options._timeout = timeout
                self.pg = dist.ProcessGroupGloo(self.store, self.rank, 2, options)
            else:
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timeout
                self.pg = dist.ProcessGroupNCCL(self.store, self.rank, 2, options)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            self.broken = True
            raise
        finally:
            self.setup_s = time.perf_counter() - start
            self.ready.set()
        logger.info(
            "pdserve kv: pair %s (%s, rank %d) ready in %.1f ms",
            self.pair_id,
            self.backend,
            self.rank,
            self.setup_s * 1e3,
        )

    def wait_ready(self, timeout_s: float) -> None:
        if not self.ready.wait(timeout_s):
            raise TimeoutError(f"pair {self.pair_id} not ready after {timeout_s:.1f} s")
        if self.error is not None:
            raise RuntimeError(f"pair {self.pair_id} failed to form: {self.error}")

    def abort(self) -> None:
        """Closes the connection so that no pending operation can touch memory again."""
        self.broken = True
        if self.pg is not None:
            with contextlib.suppress(Exception):
                self.pg.abort()


def tag_of(seq: int, index: int) -> int:
    if index >= MESSAGES_PER_TRANSFER:
        raise ValueError(f"a transfer may have at most {MESSAGES_PER_TRANSFER} messages")
    return (seq % (1 << 15)) * MESSAGES_PER_TRANSFER + index


def post_transfer(pair: Pair, tensors: Iterable[torch.Tensor], seq: int, send: bool) -> list[Any]:
    """Posts one send (or receive) per tensor; tags keep concurrent transfers apart."""
    works = []
    for index, tensor in enumerate(tensors):
        tag = tag_of(seq, index)
        if send:
            works.append(pair.pg.send([tensor], pair.peer_rank, tag))
        else:
            works.append(pair.pg.recv([tensor], pair.peer_rank, tag))
    return works


def wait_all(works: list[Any], deadline: float) -> None:
    """Waits for every operation, raising TimeoutError past the deadline."""
    for work in works:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("transfer deadline passed")
        try:
            work.wait(timedelta(seconds=remaining))
        except RuntimeError as e:
            if "Timed out" in str(e) or "timed out" in str(e):
                raise TimeoutError(str(e)) from e
            raise


def kv_codec(secret: bytes) -> Codec[Any]:
    return Codec(KVMessage, secret)
