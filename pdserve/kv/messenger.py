"""The ZeroMQ side of KV control: one I/O thread per process owns every socket (torch-free).

Workers' KV servers and the scheduler side's engine control server both use a ``Messenger``:
a ROUTER bound to their address for requests from peers, one DEALER per peer they call.
Other threads never touch a socket: they hand frames to the I/O thread through a queue and
a wake-up pipe, and replies to their requests come back in per-request mailboxes. Every
frame carries the cluster secret's MAC (``pdserve.protocol.wire``); one that fails it is
dropped and logged.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from pdserve.kv.messages import KVMessage, StoreSet
from pdserve.logs import get_logger
from pdserve.protocol.wire import AuthError, Codec

logger = get_logger(__name__)

RequestHandler = Callable[[bytes, Any], None]

# How long what was queued for a dropped peer may still go out. A peer found silent may only
# have been slow: the PairClose or Release sent just before the drop should still reach it,
# while a backlog for a dead one must not wait for it to come back.
DROPPED_LINGER_MS = 200


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
        self._pipe_closed = False
        self._mailboxes: dict[int, queue.SimpleQueue[Any]] = {}
        self._mailbox_lock = threading.Lock()
        self._rids = itertools.count(1)
        self._stopped = threading.Event()
        self._debug = logger.isEnabledFor(logging.DEBUG)
        # DEALERs dropped while a poll's results are being handled: closed once they are.
        self._closing: list[zmq.Socket] = []
        # How often the I/O loop crashed and was restarted (each crash is logged).
        self.restarts = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- API for other threads -------------------------------------------------------------

    def new_request(
        self, box: queue.SimpleQueue[Any] | None = None
    ) -> tuple[int, queue.SimpleQueue[Any]]:
        """A request id and the mailbox where replies carrying it will arrive.

        ``box``: an existing mailbox to share (a liveness probe sent while a request waits
        for its reply answers into the same mailbox); by default a new one.
        """
        rid = next(self._rids)
        if box is None:
            box = queue.SimpleQueue()
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
        """Closes the connection to an unresponsive peer; the next send reconnects.

        What is queued for it has ``DROPPED_LINGER_MS`` to go out, then is discarded.
        """
        self._enqueue("drop", address, None)

    def stop(self) -> None:
        """Ends the I/O thread; the wake pipe is closed here, after it, never by the thread
        itself (which can see the stop flag and exit before this call's wake-up is
        written: the write then hit a closed descriptor, EBADF)."""
        self._stopped.set()
        self._wake()
        self._thread.join(timeout=5)
        if not self._thread.is_alive() and not self._pipe_closed:
            self._pipe_closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)

    # --- the I/O thread --------------------------------------------------------------------

    def _enqueue(self, kind: str, target: Any, message: Any) -> None:
        frames = self._codec.encode(message) if message is not None else []
        self._outbox.put((kind, target, frames))
        self._wake()

    def _wake(self) -> None:
        if self._pipe_closed:
            return  # stopped: nothing to wake
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
                    # Not closed yet: it may be in the poll results being handled; reading a
                    # closed socket raises ENOTSOCK. ``_close_dropped`` closes it afterwards.
                    sock = self._dealers.pop(target)
                    self._poller.unregister(sock)
                    self._closing.append(sock)
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
        """Runs the I/O loop until ``stop``; a crash is logged, counted and the loop restarted."""
        self._poller = zmq.Poller()
        if self._router is not None:
            self._poller.register(self._router, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stopped.is_set():
                try:
                    self._loop()
                except Exception:
                    self.restarts += 1
                    logger.exception(
                        "pdserve kv: messenger I/O loop crashed (restart %d)", self.restarts
                    )
                    self._close_dropped()
                    time.sleep(0.01)  # no busy loop if the crash repeats
        finally:
            self._close_dropped()
            for sock in [*self._dealers.values(), self._router]:
                if sock is not None:
                    sock.close(linger=0)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            events = dict(self._poller.poll(1000))
            if self._wake_r in events:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            self._flush_outbox()
            for sock in events:
                if sock is self._wake_r:
                    continue
                assert isinstance(sock, zmq.Socket)
                if sock is not self._router and (sock in self._closing or sock.closed):
                    continue  # dropped during this iteration: its replies are discarded
                self._read(sock)
            self._close_dropped()

    def _read(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if sock is self._router:
                identity, body = frames[0], frames[1:]
                message = self._decode(body)
                if message is not None:
                    self._deliver(message, identity)
            else:
                message = self._decode(frames)
                if message is not None:
                    self._deliver(message, None)

    def _close_dropped(self) -> None:
        while self._closing:
            with contextlib.suppress(zmq.ZMQError):
                self._closing.pop().close(linger=DROPPED_LINGER_MS)


def kv_codec(secret: bytes) -> Codec[Any]:
    """The codec of every KV-control message (``pdserve.kv.messages.KVMessage``)."""
    return Codec(KVMessage, secret)
