"""Point-to-point transport between workers: authenticated ZeroMQ control, torch.distributed data.

Pieces, bottom up:

- ``Messenger`` (``pdserve.kv.messenger``, torch-free): one thread owns every ZeroMQ socket of
  a worker (a ROUTER for peers' requests, one DEALER per peer it calls); other threads hand it
  frames through a queue.
- ``PairStore``: the rendezvous store of a process group of two, mirrored to the other member
  over the messenger, so no unauthenticated TCPStore port is ever opened.
- ``Pair``: that process group (gloo for CPU caches, NCCL for CUDA caches), created on demand
  when two workers first exchange KV, so instances can join at any time and no world size is
  fixed. Its set-up cost is paid once per pair and logged.
- ``transfer``: one send or receive per (plane, run of consecutive blocks), straight from
  and into the KV cache: no staging copy on either side. Any number of messages: they are
  posted in windows of at most ``MESSAGES_PER_WINDOW`` (``post_transfer``), each waited for
  (``wait_all``) before the next is posted, so no two operations outstanding on a pair ever
  share a tag.

If a transfer stalls, the pair is aborted before anything else happens: gloo then drops the
pending receives, so no late write can land in blocks that were given back to vLLM.

Failures are typed (``KVTimeout`` for a deadline, ``KVError`` with a ``KVFailure`` code for
the rest), never recognised by their text. Whether a pair may form at all (protocol version,
plane digest) is decided by the worker in ``PairOpen``/``PairOpened`` before ``Pair``
rendezvous starts.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist

from pdserve.kv.messages import KVError, KVFailure, KVTimeout, StoreSet, another_start

# The messenger moved to its own torch-free module; importers of these names here keep working.
from pdserve.kv.messenger import Messenger, kv_codec
from pdserve.logs import get_logger

__all__ = [
    "Messenger",
    "Pair",
    "PairStore",
    "backend_for",
    "kv_codec",
    "post_transfer",
    "tag_of",
    "transfer",
    "wait_all",
]

logger = get_logger(__name__)

# Operations of one transfer posted at once (tags are 31-bit: 2^15 sequence numbers x this).
MESSAGES_PER_WINDOW = 1 << 16


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
        # Set by ``abort``: every wait, now or later, fails with it instead of waiting on.
        self.aborted: KVFailure | None = None

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

    def abort(self, failure: KVFailure) -> None:
        """Ends the rendezvous: a wait for the peer's keys fails with ``failure`` at once.

        A peer that died after accepting the pair never sets its keys; without this the
        process group's constructor would wait for them for the whole set-up timeout.
        """
        with self._changed:
            self.aborted = self.aborted or failure
            self._changed.notify_all()

    def abort_error(self) -> KVError | None:
        """A new error saying why the rendezvous was aborted (None while it was not)."""
        if self.aborted is None:
            return None
        return KVError(self.aborted, f"pair {self.pair_id} was torn down ({self.aborted})")

    def _wait_for(self, keys: Iterable[str], timeout_s: float) -> None:
        keys = list(keys)
        with self._changed:
            ok = self._changed.wait_for(
                lambda: self.aborted is not None or all(k in self._data for k in keys), timeout_s
            )
        aborted = self.abort_error()
        if aborted is not None:
            raise aborted
        if not ok:
            raise KVTimeout(f"pair {self.pair_id}: peer never set {keys}")

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


class PairTable:
    """A worker's pairs, by id and (those it opened) by peer, under one lock."""

    def __init__(self) -> None:
        self.by_id: dict[str, Pair] = {}
        self.by_peer: dict[str, Pair] = {}
        self.lock = threading.Lock()

    def all(self) -> list[Pair]:
        with self.lock:
            return list(self.by_id.values())

    def stale(self, address: str, incarnation: str) -> list[Pair]:
        """The pairs with an earlier start of the peer at ``address``, now ``incarnation``
        (pairs whose peer's start is unknown, or an unknown ``incarnation``: none)."""
        return [
            p
            for p in self.all()
            if p.peer_address == address and another_start(p.peer_incarnation, incarnation)
        ]

    def forget(self, pair: Pair) -> None:
        with self.lock:
            self.by_id.pop(pair.pair_id, None)
            for peer, known in list(self.by_peer.items()):
                if known is pair:
                    del self.by_peer[peer]


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
        # Why it did not form (see ``wait_ready``): set with ``error``.
        self.failure = KVFailure.PAIR_FAILED
        self.pg: Any = None
        self.setup_s = 0.0
        self.broken = False
        self._seq = itertools.count()
        # The other member's KV server, probed to find out whether it is alive ("": unknown),
        # and the start of it this pair was formed with (``Pong.incarnation``; "": unknown).
        self.peer_address = ""
        self.peer_incarnation = ""
        # When a transfer last started or ended on the pair (a liveness check skips it then).
        self.last_used = time.monotonic()

    def next_seq(self) -> int:
        return next(self._seq)

    def establish(self) -> None:
        """Blocks until both members have joined (or the store times out, or ``abort``)."""
        start = time.perf_counter()
        try:
            self.pg = self._form()
            if self.broken:  # aborted while forming, after the store's last wait
                self.abort(self.store.aborted or KVFailure.PAIR_FAILED)
                raise self.store.abort_error() or KVError(KVFailure.PAIR_FAILED, "aborted")
        except Exception as e:
            # torch may hand the store's error back as another type: the abort says why.
            error = e if isinstance(e, KVError) else self.store.abort_error()
            if error is None:
                error = KVError(
                    KVFailure.PAIR_FAILED,
                    f"pair {self.pair_id} failed to form: {type(e).__name__}: {e}",
                )
            self.error, self.failure, self.broken = str(error), error.failure, True
            if error is e:
                raise
            raise error from e
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
        """Blocks until the pair formed; ``KVTimeout`` past ``timeout_s``, ``KVError`` if not."""
        if not self.ready.wait(timeout_s):
            raise KVTimeout(f"pair {self.pair_id} not ready after {timeout_s:.1f} s")
        if self.error is not None:
            raise KVError(self.failure, f"pair {self.pair_id} failed to form: {self.error}")

    def _form(self) -> Any:
        """The process group of two (its constructor is the rendezvous, over the store)."""
        timeout = timedelta(seconds=self._timeout_s)
        if self.backend == "gloo":
            options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=self._host)]
            options._timeout = timeout
            return dist.ProcessGroupGloo(self.store, self.rank, 2, options)
        nccl_options = dist.ProcessGroupNCCL.Options()
        nccl_options._timeout = timeout
        return dist.ProcessGroupNCCL(self.store, self.rank, 2, nccl_options)

    def abort(self, failure: KVFailure = KVFailure.PAIR_FAILED) -> None:
        """Closes the connection so that no pending operation can touch memory again.

        A pair still forming fails at once with ``failure`` (``PEER_GONE`` when its peer
        answers no probe) instead of after the set-up timeout.
        """
        self.broken = True
        self.store.abort(failure)
        if self.pg is not None:
            with contextlib.suppress(Exception):
                self.pg.abort()


def tag_of(seq: int, index: int) -> int:
    """The tag of message ``index`` of a window of transfer ``seq`` (see ``transfer``)."""
    if not 0 <= index < MESSAGES_PER_WINDOW:
        raise ValueError(f"a window may have at most {MESSAGES_PER_WINDOW} messages")
    return (seq % (1 << 15)) * MESSAGES_PER_WINDOW + index


def transfer(
    pair: Pair, tensors: Sequence[torch.Tensor], seq: int, send: bool, deadline: float
) -> None:
    """Sends (or receives) every tensor over the pair by the deadline, in windows.

    Both ends post the same windows in the same order and finish each before posting the
    next, so message i of a window can only meet message i of the same window on the other
    side, however many messages (fragmented runs of a long prompt) the transfer has.
    """
    for start in range(0, len(tensors), MESSAGES_PER_WINDOW):
        window = tensors[start : start + MESSAGES_PER_WINDOW]
        wait_all(post_transfer(pair, window, seq, send), deadline, pair.backend)


def post_transfer(pair: Pair, tensors: Iterable[torch.Tensor], seq: int, send: bool) -> list[Any]:
    """Posts one send (or receive) per tensor of one window (at most MESSAGES_PER_WINDOW)."""
    works = []
    for index, tensor in enumerate(tensors):
        tag = tag_of(seq, index)
        if send:
            works.append(pair.pg.send([tensor], pair.peer_rank, tag))
        else:
            works.append(pair.pg.recv([tensor], pair.peer_rank, tag))
    return works


# torch measures a wait's timeout in whole milliseconds: a wait that raised within this
# much of its deadline used up its allowance.
_WAIT_SLACK_S = 0.005


def wait_all(works: list[Any], deadline: float, backend: str = "gloo") -> None:
    """Waits for every operation: ``KVTimeout`` past the deadline, ``KVError`` if one failed.

    torch raises the same plain ``RuntimeError`` for a timed-out wait and for a broken
    connection, so which one happened is read from the clock, not from the message: a wait
    that failed once its whole allowance had passed timed out (as does one that returns
    False); one that failed earlier is a transport error.

    NCCL: ``work.wait()`` only makes the calling thread's current CUDA stream wait for the
    operation (unless ``TORCH_NCCL_BLOCKING_WAIT``) and returns before the data is there, so
    each operation's end event is polled (``is_completed``) until it has run on the device;
    only then are the blocks considered sent or loaded.
    """
    for index, work in enumerate(works):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise KVTimeout(f"transfer deadline passed before operation {index} of {len(works)}")
        if backend == "nccl":
            _wait_on_device(work, deadline, f"operation {index} of {len(works)}")
            continue
        try:
            done = work.wait(timedelta(seconds=remaining))
        except RuntimeError as e:
            if time.monotonic() >= deadline - _WAIT_SLACK_S:
                raise KVTimeout(f"operation {index} of {len(works)} timed out: {e}") from e
            raise KVError(
                KVFailure.TRANSPORT_ERROR, f"operation {index} of {len(works)} failed: {e}"
            ) from e
        if done is False:
            raise KVTimeout(f"operation {index} of {len(works)} timed out")


# Polling an NCCL operation: first pause, and the longest one (each pause doubles).
_POLL_FIRST_S = 50e-6
_POLL_MAX_S = 1e-3


def _wait_on_device(work: Any, deadline: float, what: str) -> None:
    """Waits until an NCCL operation has run on the device (its end event), or the deadline."""
    pause = _POLL_FIRST_S
    while not work.is_completed():
        if time.monotonic() >= deadline:
            raise KVTimeout(f"{what} timed out (not run on the device by the deadline)")
        time.sleep(pause)
        pause = min(2 * pause, _POLL_MAX_S)
    try:
        work.wait()  # completed: raises the operation's error, if it had one
    except RuntimeError as e:
        raise KVError(KVFailure.TRANSPORT_ERROR, f"{what} failed: {e}") from e
