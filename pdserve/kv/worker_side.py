"""The worker half of the connector: serves exports and runs loads, off the model's thread.

Every worker runs a KV server (a ``Messenger`` bound to ``port + tp_rank``). An *export* is a
set of blocks the scheduler side asked to keep for a pull (a finished prefill, or a request
that is moving away; see ``pdserve.kv.exports``). A *load* is a pull of another instance's
export into blocks that vLLM allocated here. Both finish exactly once, and the scheduler
hears of it through ``get_transfer_results``; that is what lets vLLM free (or start using)
the blocks.

Threads: the model runner's thread calls the order methods (``add_export``, ``start_load``,
...) and ``poll``/``take_stats`` once per step, and they never block on the network. The
messenger's I/O thread receives requests; serving threads (``pdserve-kv-serve``) run pulls
served to peers and loading threads (``pdserve-kv-load``) run pulls from peers; those two
pools block on torch.distributed and ZeroMQ round trips, within the transfer timeouts.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from pdserve.kv.exports import ExportRegistry, Refusal
from pdserve.kv.holdings import HoldingsReporter
from pdserve.kv.layout import KVLayout, block_runs, run_blocks
from pdserve.kv.liveness import PeerWatch
from pdserve.kv.messages import (
    Ack,
    Failed,
    InjectFault,
    KVError,
    KVFailure,
    KVTimeout,
    PairClose,
    PairOpen,
    PairOpened,
    Ping,
    Pong,
    PullFinished,
    PullRequest,
    PullStarted,
    Release,
    Run,
    StoreSet,
    failure_of,
)
from pdserve.kv.messenger import Messenger, kv_codec
from pdserve.kv.metadata import (
    PROTOCOL_VERSION,
    ExportOrder,
    ExportUpdate,
    LoadOrder,
    ReleaseOrder,
)
from pdserve.kv.settings import KVSettings
from pdserve.kv.transport import Pair, PairTable, backend_for, post_transfer, transfer, wait_all
from pdserve.logs import get_logger
from pdserve.protocol.reports import KVHoldings, TransferCounters

__all__ = [
    "ExportOrder",
    "ExportRegistry",
    "ExportUpdate",
    "KVWorker",
    "LoadOrder",
    "LoadResult",
    "ReleaseOrder",
]

logger = get_logger(__name__)

T = TypeVar("T")


# A load may wait this many transfer timeouts for its turn on a busy pair.
QUEUE_PATIENCE = 6

# Failures that mean the pair itself is unusable; any other refusal of a pull leaves it be.
BROKEN_PAIR = frozenset({KVFailure.TIMEOUT, KVFailure.TRANSPORT_ERROR, KVFailure.PAIR_FAILED})


@dataclass
class LoadResult:
    req_id: str
    ok: bool
    error: str = ""
    failure: KVFailure | None = None
    nbytes: int = 0
    seconds: float = 0.0


class KVWorker:
    """Owns the KV server of one worker and runs its transfers."""

    def __init__(self, settings: KVSettings, layout: KVLayout, tp_rank: int, secret: bytes):
        self.settings = settings
        self.layout = layout
        self.tp_rank = tp_rank
        self.address = settings.address_of_rank(tp_rank)
        self.incarnation = settings.incarnation or uuid.uuid4().hex
        self.backend = backend_for(layout.device, settings.backend)
        self.staging = settings.staging
        self.exports = ExportRegistry()
        self._pairs = PairTable()
        self._results: queue.SimpleQueue[LoadResult] = queue.SimpleQueue()
        self._stats = TransferCounters()
        self._stats_lock = threading.Lock()
        self._inflight = 0  # pulls served or made right now (under _stats_lock)
        self._faults_enabled = os.environ.get("PDSERVE_FAULT_INJECTION") == "1"
        self._pull_delays: list[float] = []
        # Serving and loading get their own threads, so that two instances pulling from each
        # other at once can never starve one another.
        self._serve_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pdserve-kv-serve")
        self._load_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pdserve-kv-load")
        # The server's half of pair set-up gets threads of its own: pulls waiting for a pair
        # to form must not take every serving thread from the set-up they wait for.
        self._setup_pool = ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="pdserve-kv-pair-setup"
        )
        self._stopping = threading.Event()
        self.messenger = Messenger(
            kv_codec(secret),
            settings.bind_address_of_rank(tp_rank),
            on_request=self._on_request,
            on_store_set=self._on_store_set,
        )
        self._holdings_reporter = (
            HoldingsReporter(settings, tp_rank, self.holdings, secret)
            if settings.control_address
            else None
        )
        # Probes peers (while a pull waits, and those of idle pairs): see pdserve.kv.liveness.
        self._liveness = PeerWatch(
            self.messenger,
            settings.pair_probe_timeout_s,
            self._pairs.all,
            self._drop_peer,
            self._drop_stale_pairs,
        )
        logger.info(
            "pdserve kv: worker %d serving %d planes (%d bytes/block, %s) at %s",
            tp_rank,
            len(layout.planes),
            layout.bytes_per_block,
            self.backend,
            self.address,
        )

    # --- orders from the scheduler side (model thread) -------------------------------------

    def add_export(self, order: ExportOrder) -> None:
        """Keeps a request's blocks for pulls (from ``bind_connector_metadata``, per step).

        Wakes serving threads whose pull waits for this export; never blocks long.
        """
        logger.debug(
            "pdserve kv: export %s (%d blocks) registered", order.transfer_id, len(order.block_ids)
        )
        self.exports.add(order)

    def update_export(self, update: ExportUpdate) -> None:
        """A live export grew, took over its blocks or became void (model thread, per step)."""
        self.exports.update(update)

    def start_load(self, order: LoadOrder) -> None:
        """Submits a pull to the loading threads (model thread, per step); returns at once.

        Its outcome is reported exactly once by a later ``poll``.
        """
        logger.debug("pdserve kv: load %s (%d blocks) ordered", order.transfer_id, len(order.dst))
        self._load_pool.submit(self._counted, self._run_load, order)

    def start_sync_load(self, order: LoadOrder) -> Future[LoadResult]:
        """Submits a synchronous pull (model thread, per step); the caller waits on it before
        the forward (``PdConnector.start_load_kv``). Its outcome is that future's, never
        ``poll``'s: vLLM does not wait for a sync load to be reported finished."""
        logger.debug("pdserve kv: sync load %s (%d blocks)", order.transfer_id, len(order.dst))
        return self._load_pool.submit(self._counted, self._load, order)

    def send_release(self, order: ReleaseOrder) -> None:
        """Tells this rank's exporter its blocks will not be pulled (queued, non-blocking)."""
        address = order.addresses[self.tp_rank]
        self.messenger.send(address, Release(transfer_id=order.transfer_id))

    def poll(self) -> tuple[set[str], set[str], set[str]]:
        """(finished sending, finished receiving, failed receiving) since the last call.

        Model thread, once per step (``get_transfer_results``): expires leases that passed
        and drains the result queues; never blocks on the network.
        """
        self.exports.expire()
        sending = set()
        while not self.exports.finished.empty():
            sending.add(self.exports.finished.get_nowait())
        recving, failed = set(), set()
        while not self._results.empty():
            result = self._results.get_nowait()
            recving.add(result.req_id)
            if not result.ok:
                failed.add(result.req_id)
        return sending, recving, failed

    def _counted(self, transfer: Callable[..., T], *args: Any) -> T:
        """Runs a served or made pull on a pool thread, counted in ``inflight_pulls``."""
        with self._stats_lock:
            self._inflight += 1
        try:
            return transfer(*args)
        finally:
            with self._stats_lock:
                self._inflight -= 1

    def holdings(self) -> KVHoldings:
        """What this worker holds now (model thread, once per step; in-memory only)."""
        with self._stats_lock:
            inflight = self._inflight
        return KVHoldings(
            held_exports=len(self.exports),
            open_pairs=len(self._pairs.by_id),
            inflight_pulls=inflight,
        )

    def take_stats(self) -> TransferCounters:
        """Counters since the last call (model thread, once per step; never blocks long)."""
        with self._stats_lock:
            stats, self._stats = self._stats, TransferCounters()
        expired, self.exports.expired_count = self.exports.expired_count, 0
        return stats + TransferCounters(leases_expired=expired) if expired else stats

    def shutdown(self) -> None:
        """Stops the KV server and the pools, and aborts every pair (pending transfers end)."""
        if self._stopping.is_set():
            return  # already stopped
        self._stopping.set()
        self._liveness.stop()
        if self._holdings_reporter is not None:
            self._holdings_reporter.stop()
        self.messenger.stop()
        self._serve_pool.shutdown(wait=False, cancel_futures=True)
        self._load_pool.shutdown(wait=False, cancel_futures=True)
        self._setup_pool.shutdown(wait=False, cancel_futures=True)
        with self._pairs.lock:
            pairs = list(self._pairs.by_id.values())
        for pair in pairs:
            pair.abort()

    # --- the server half ------------------------------------------------------------------

    def _on_request(self, identity: bytes, message: object) -> None:
        if isinstance(message, PairOpen):
            self._open_server_pair(identity, message)
        elif isinstance(message, PairClose):
            self._close_server_pair(message.pair_id)
        elif isinstance(message, Ping):
            pong = Pong(rid=message.rid, incarnation=self.incarnation)
            self.messenger.reply(identity, pong)  # on the I/O thread: at once
        elif isinstance(message, PullRequest):
            self._serve_pool.submit(self._counted, self._serve_pull, identity, message)
        elif isinstance(message, Release):
            self.exports.release(message.transfer_id, tombstone_s=2 * self.settings.lease_s)
        elif isinstance(message, InjectFault):
            if not self._faults_enabled:
                error = "fault injection is disabled (PDSERVE_FAULT_INJECTION=1 enables it)"
                failed = Failed(rid=message.rid, code=KVFailure.FAULTS_DISABLED, error=error)
                self.messenger.reply(identity, failed)
                return
            logger.warning(
                "pdserve kv: injected fault: next %d pulls stall %.1f s",
                message.count,
                message.delay_s,
            )
            self._pull_delays.extend([message.delay_s] * message.count)
            self.messenger.reply(identity, Ack(rid=message.rid))
        else:
            logger.warning("pdserve kv: unexpected request %s", type(message).__name__)

    def _on_store_set(self, message: StoreSet) -> None:
        pair = self._pairs.by_id.get(message.pair_id)
        if pair is not None:
            pair.store.receive(message)

    def _open_server_pair(self, identity: bytes, message: PairOpen) -> None:
        refusal = self._refuse_pair(message)
        if refusal is not None:
            logger.warning("pdserve kv: refused pair %s: %s", message.pair_id, refusal)
            self.messenger.reply(
                identity, Failed(rid=message.rid, code=refusal.failure, error=str(refusal))
            )
            return
        pair = Pair(
            message.pair_id,
            rank=0,
            backend=message.backend,
            host=self.settings.advertise_host or self.settings.host,
            timeout_s=self.settings.pair_setup_timeout_s,
            mirror=lambda s: self.messenger.reply(identity, s),
        )
        pair.peer_address, pair.peer_incarnation = message.address, message.incarnation
        with self._pairs.lock:
            # An initiator keeps one pair with us: one it opened before is gone (it restarted,
            # or dropped that pair without its PairClose reaching us).
            stale = [
                p
                for p in self._pairs.by_id.values()
                if p.rank == 0 and message.address and p.peer_address == message.address
            ]
            self._pairs.by_id[message.pair_id] = pair
        for old in stale:
            logger.info(
                "pdserve kv: %s paired again; closing its pair %s", message.address, old.pair_id
            )
            old.abort()
            self._pairs.forget(old)
        self._drop_stale_pairs(
            message.address, self._pairs.stale(message.address, message.incarnation)
        )
        opened = PairOpened(
            rid=message.rid, protocol=PROTOCOL_VERSION, incarnation=self.incarnation
        )
        self.messenger.reply(identity, opened)
        self._setup_pool.submit(self._establish, pair)

    def _refuse_pair(self, message: PairOpen) -> Refusal | None:
        """Why this worker cannot pair with the initiator, if it cannot."""
        if message.protocol != PROTOCOL_VERSION:
            return Refusal(
                KVFailure.PROTOCOL_MISMATCH,
                f"KV protocol versions differ: the peer speaks version {message.protocol}, "
                f"this worker version {PROTOCOL_VERSION}",
            )
        if message.plane_digest != self.layout.plane_digest:
            return Refusal(
                KVFailure.PLANE_MISMATCH,
                f"KV plane digests differ: the peer has {message.plane_digest}, "
                f"this worker {self.layout.plane_digest}",
            )
        return None

    def _close_server_pair(self, pair_id: str) -> None:
        """The initiator tore the pair down: abort and forget our end of it."""
        with self._pairs.lock:
            pair = self._pairs.by_id.get(pair_id)
        if pair is None or pair.rank != 0:
            return
        logger.info("pdserve kv: peer closed pair %s", pair_id)
        pair.abort()
        self._pairs.forget(pair)

    def _establish(self, pair: Pair) -> None:
        try:
            pair.establish()
        except Exception as e:
            logger.warning("pdserve kv: pair %s failed: %s", pair.pair_id, e)
            self._pairs.forget(pair)

    def _serve_pull(self, identity: bytes, request: PullRequest) -> None:
        # Everything that can refuse the pull is checked before the export is claimed: a
        # claimed last pull closes the export, so a refusal after it would lose its KV.
        pair = self._pair_for_pull(request)
        claimed = pair if isinstance(pair, Refusal) else self.exports.begin_pull(request)
        if isinstance(claimed, Refusal):
            self.messenger.reply(
                identity, Failed(rid=request.rid, code=claimed.failure, error=str(claimed))
            )
            return
        export, src = claimed
        assert isinstance(pair, Pair)
        try:
            runs = block_runs(src, request.dst)
            staged = request.staging == "always" or (
                request.staging == "auto" and self.layout.prefer_staged(runs)
            )
            self.messenger.reply(identity, PullStarted(rid=request.rid, src=src, staged=staged))
            if self._pull_delays:
                time.sleep(self._pull_delays.pop(0))
            tensors = self._outgoing(runs, staged)
            pair.last_used = time.monotonic()
            deadline = time.monotonic() + self.settings.transfer_timeout_s
            transfer(pair, tensors, request.seq, send=True, deadline=deadline)
            pair.last_used = time.monotonic()
            # The blocks were pinned for the whole read; say whether they stayed valid.
            self.messenger.reply(identity, PullFinished(rid=request.rid, valid=export.valid))
            self._add_stats(TransferCounters(bytes_sent=sum(t.nbytes for t in tensors)))
            logger.debug("pdserve kv: served %s (%d messages)", request.transfer_id, len(tensors))
        except Exception as e:
            logger.warning("pdserve kv: sending %s failed: %s", request.transfer_id, e)
            pair.abort()
            self._pairs.forget(pair)
            failed = Failed(rid=request.rid, code=failure_of(e), error=f"{type(e).__name__}: {e}")
            self.messenger.reply(identity, failed)
        finally:
            self.exports.end_pull(export)

    def _pair_for_pull(self, request: PullRequest) -> Pair | Refusal:
        """The pair a pull names, formed; else why not (waits for a pair still forming)."""
        pair = self._pairs.by_id.get(request.pair_id)
        if pair is None or pair.broken or pair.rank != 0:
            return Refusal(KVFailure.UNKNOWN_PAIR, f"unknown pair {request.pair_id}")
        try:
            pair.wait_ready(self.settings.pair_setup_timeout_s)
        except KVError as e:
            pair.abort()
            self._pairs.forget(pair)
            return Refusal(e.failure, str(e))
        return pair

    # --- the initiator half ---------------------------------------------------------------

    def _pair_with(self, address: str, deadline: float) -> Pair:
        with self._pairs.lock:
            pair = self._pairs.by_peer.get(address)
            if pair is not None and not pair.broken:
                opener = False
            else:
                pair_id = f"{self.settings.instance_id}.{self.tp_rank}.{uuid.uuid4().hex[:12]}"
                pair = Pair(
                    pair_id,
                    rank=1,
                    backend=self.backend,
                    host=self.settings.advertise_host or self.settings.host,
                    timeout_s=self.settings.pair_setup_timeout_s,
                    mirror=lambda s: self.messenger.send(address, s),
                )
                pair.peer_address = address
                self._pairs.by_id[pair_id] = pair
                self._pairs.by_peer[address] = pair
                opener = True
        if not opener:
            pair.wait_ready(max(0.0, deadline - time.monotonic()))
            return pair
        try:
            self._open_client_pair(pair, address, deadline)
        except Exception as e:
            pair.error = pair.error or str(e)
            pair.ready.set()
            self._drop_pair(pair, address)
            raise
        self._add_stats(TransferCounters(pairs_opened=1, pair_setup_seconds=pair.setup_s))
        return pair

    def _open_client_pair(self, pair: Pair, address: str, deadline: float) -> None:
        """Asks the server for a pair, then forms it (the process group's rendezvous).

        The server answers ``PairOpen`` on its I/O thread, whatever its serving threads do,
        so the answer doubles as the liveness probe before the rendezvous: none within
        ``pair_probe_timeout_s`` means the exporter is gone (``PEER_GONE``), and the load
        fails at once instead of after ``pair_setup_timeout_s``.
        """
        probe_s = self.settings.pair_probe_timeout_s
        rid, box = self.messenger.new_request()
        try:
            self.messenger.send(
                address,
                PairOpen(
                    rid=rid,
                    pair_id=pair.pair_id,
                    backend=pair.backend,
                    plane_digest=self.layout.plane_digest,
                    protocol=PROTOCOL_VERSION,
                    address=self.address,
                    incarnation=self.incarnation,
                ),
            )
            reply = box.get(timeout=max(0.0, min(deadline - time.monotonic(), probe_s)))
        except queue.Empty:
            self.messenger.drop_peer(address)
            raise KVError(
                KVFailure.PEER_GONE, f"no answer from KV server {address} in {probe_s:.1f} s"
            ) from None
        finally:
            self.messenger.forget(rid)
        if isinstance(reply, Failed):
            raise KVError(reply.code, f"{address} refused the pair: {reply.error}")
        if not isinstance(reply, PairOpened) or reply.protocol != PROTOCOL_VERSION:
            protocol = getattr(reply, "protocol", "unknown")
            raise KVError(
                KVFailure.PROTOCOL_MISMATCH,
                f"KV protocol versions differ: {address} speaks version {protocol}, "
                f"this worker version {PROTOCOL_VERSION}",
            )
        pair.peer_incarnation = reply.incarnation
        self._drop_stale_pairs(address, self._pairs.stale(address, reply.incarnation))
        pair.establish()

    def _drop_pair(self, pair: Pair, address: str) -> None:
        """Tears a broken pair down here and tells the server to close its end too."""
        pair.abort()
        self._pairs.forget(pair)
        self.messenger.send(address, PairClose(pair_id=pair.pair_id))

    def _drop_peer(self, address: str) -> None:
        """The peer at ``address`` answers no probe: every pair with it goes, both ways.

        What is queued for it is discarded; the pairs this worker opened are still closed
        with ``PairClose``, delivered if the peer was only slow (or once it is back). A pair
        still forming with it fails at once (``PEER_GONE``), not after the set-up timeout.
        """
        with self._pairs.lock:
            gone = [p for p in self._pairs.by_id.values() if p.peer_address == address]
        self.messenger.drop_peer(address)
        for pair in gone:
            pair.abort(KVFailure.PEER_GONE)
            self._pairs.forget(pair)
            if pair.rank == 1:
                self.messenger.send(address, PairClose(pair_id=pair.pair_id))
        if gone:
            logger.warning(
                "pdserve kv: %s does not answer; dropped %d pairs with it", address, len(gone)
            )

    def _drop_stale_pairs(self, address: str, stale: list[Pair]) -> None:
        """The peer at ``address`` restarted since these pairs formed (another incarnation
        answers there): they go here; the new start knows none of them, so nothing is sent."""
        for pair in stale:
            pair.abort(KVFailure.PEER_GONE)
            self._pairs.forget(pair)
        if stale:
            logger.warning("pdserve kv: %s restarted; dropped %d stale pairs", address, len(stale))

    def _run_load(self, order: LoadOrder) -> None:
        """Runs one asynchronous load and reports it exactly once (``poll``), whatever happens."""
        self._results.put(self._load(order))

    def _load(self, order: LoadOrder) -> LoadResult:
        """Runs one load; its result, whatever happens (counted and logged)."""
        start = time.perf_counter()
        result = LoadResult(
            order.req_id, ok=False, error="load did not run", failure=KVFailure.TRANSPORT_ERROR
        )
        try:
            if not order.dst:
                if order.last:
                    self.send_release(ReleaseOrder(order.transfer_id, order.addresses))
                result = LoadResult(order.req_id, ok=True)
            else:
                nbytes = self._pull(order)
                result = LoadResult(order.req_id, ok=True, nbytes=nbytes)
        except Exception as e:
            result = LoadResult(
                order.req_id, ok=False, error=f"{type(e).__name__}: {e}", failure=failure_of(e)
            )
        finally:
            result.seconds = time.perf_counter() - start
            if result.ok:
                self._add_stats(
                    TransferCounters(
                        loads_ok=1, bytes_received=result.nbytes, load_seconds=result.seconds
                    )
                )
                logger.debug(
                    "pdserve kv: loaded %s (%d bytes) in %.1f ms",
                    order.transfer_id,
                    result.nbytes,
                    result.seconds * 1e3,
                )
            else:
                self._add_stats(TransferCounters(loads_failed=1))
                logger.warning(
                    "pdserve kv: load of %s from %s failed after %.2f s (%s): %s",
                    order.transfer_id,
                    order.addresses[self.tp_rank],
                    result.seconds,
                    result.failure,
                    result.error,
                )
        return result

    def _pull(self, order: LoadOrder) -> int:
        """Pulls over the pair with the exporter; once more over a new pair if it lost ours.

        An exporter that restarted (on the same address) refuses our old pair with
        ``unknown_pair`` before claiming its export, so the second try still finds it.
        An exporter that answers no probe is gone: every pair with it is dropped. A last
        pull that fails releases the export (best effort, also after a probe went
        unanswered: an exporter that was only slow frees it then): the request computes its
        prompt here instead, so nobody will pull it, and it need not wait for its lease.
        """
        address = order.addresses[self.tp_rank]
        try:
            try:
                return self._pull_once(order, address)
            except KVError as e:
                if e.failure is not KVFailure.UNKNOWN_PAIR:
                    raise
                logger.info("pdserve kv: %s lost our pair (%s); pairing again", address, e)
                return self._pull_once(order, address)
        except Exception as e:
            if failure_of(e) is KVFailure.PEER_GONE:
                self._drop_peer(address)
            if order.last:  # sent after any drop, which would discard it
                self.messenger.send(address, Release(transfer_id=order.transfer_id))
            raise

    def _pull_once(self, order: LoadOrder, address: str) -> int:
        timeout = self.settings.transfer_timeout_s
        pair = self._pair_with(address, time.monotonic() + self.settings.pair_setup_timeout_s)
        # Transfers on a pair run one at a time (NCCL needs both ends to agree on the order);
        # waiting for the pair is queueing, not a stall, so it has its own, longer patience.
        if not pair.lock.acquire(timeout=QUEUE_PATIENCE * timeout):
            raise KVTimeout(f"pair with {address} busy for {QUEUE_PATIENCE * timeout:.0f} s")
        try:
            if pair.broken:  # torn down by the pull before us
                raise KVError(KVFailure.UNKNOWN_PAIR, f"pair {pair.pair_id} was torn down")
            return self._pull_on(pair, order, address, time.monotonic() + timeout)
        finally:
            pair.lock.release()

    def _pull_on(self, pair: Pair, order: LoadOrder, address: str, deadline: float) -> int:
        seq = pair.next_seq()
        rid, box = self.messenger.new_request()
        refused = False
        pair.last_used = time.monotonic()
        try:
            self.messenger.send(
                address,
                PullRequest(
                    rid=rid,
                    transfer_id=order.transfer_id,
                    pair_id=pair.pair_id,
                    seq=seq,
                    first=order.first,
                    dst=order.dst,
                    wait_s=min(1.0, deadline - time.monotonic()),
                    last=order.last,
                    staging=self.staging,
                    needs_tokens=order.needs_tokens,
                ),
            )
            reply = self._liveness.reply(box, deadline, address, pair.peer_incarnation)
            if isinstance(reply, Failed):
                # Nothing was sent: unless the pair itself failed, it carries the next pull.
                refused = reply.code not in BROKEN_PAIR
                raise KVError(reply.code, f"exporter refused the pull: {reply.error}")
            assert isinstance(reply, PullStarted)
            runs = block_runs(reply.src, order.dst)
            nbytes = self._receive(pair, runs, seq, reply.staged, deadline)
            reply = self._liveness.reply(box, deadline, address, pair.peer_incarnation)
            if isinstance(reply, Failed):
                raise KVError(reply.code, f"exporter failed: {reply.error}")
            if isinstance(reply, PullFinished) and not reply.valid:
                raise KVError(
                    KVFailure.BLOCKS_CHANGED, "the exported blocks changed during the read"
                )
            return nbytes
        except BaseException as e:
            if isinstance(e, KVError) and e.failure is KVFailure.UNKNOWN_PAIR:
                pair.abort()  # the exporter does not know it: only our end is left
                self._pairs.forget(pair)
            elif not refused:
                # A broken pair (timeout, transport error): receives may still be pending, so
                # close the connection before the blocks go back to vLLM (nothing can write
                # into them later), on both sides, so that neither keeps the pair.
                self._drop_pair(pair, address)
            raise
        finally:
            self.messenger.forget(rid)
            pair.last_used = time.monotonic()

    def _outgoing(self, runs: list[Run], staged: bool) -> list[torch.Tensor]:
        """What the server sends: cache slices as they are, or staged copies of them."""
        if not staged:
            return list(self.layout.slices(runs, side=0))
        blocks = self._index(run_blocks(runs, side=0))
        return [self.layout.gather(g, blocks) for g in self.layout.stage_groups(len(blocks))]

    def _receive(self, pair: Pair, runs: list[Run], seq: int, staged: bool, deadline: float) -> int:
        """Posts the receives and waits for them; returns the bytes received.

        Direct receives land in the KV blocks themselves. Staged ones land in buffers that
        are copied into the blocks as each arrives, while later ones are still in flight.
        """
        if not staged:
            tensors = list(self.layout.slices(runs, side=1))
            transfer(pair, tensors, seq, send=False, deadline=deadline)
            return sum(t.nbytes for t in tensors)
        blocks = self._index(run_blocks(runs, side=1))
        groups = self.layout.stage_groups(len(blocks))
        buffers = [self.layout.staging_buffer(g, len(blocks)) for g in groups]
        works = post_transfer(pair, buffers, seq, send=False)
        for work, group, buffer in zip(works, groups, buffers, strict=True):
            wait_all([work], deadline, pair.backend)
            self.layout.scatter(group, blocks, buffer)
        return sum(b.nbytes for b in buffers)

    def _index(self, blocks: list[int]) -> torch.Tensor:
        return torch.tensor(blocks, dtype=torch.long, device=self.layout.device)

    def _add_stats(self, stats: TransferCounters) -> None:
        with self._stats_lock:
            self._stats = self._stats + stats
