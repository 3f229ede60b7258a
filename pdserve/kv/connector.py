"""``PdConnector``: pdserve's KV connector, loaded by vLLM through ``kv_connector_module_path``.

vLLM builds one connector object per role: in the EngineCore process (scheduler role) and in
every worker (worker role). This class only routes vLLM's calls to the half that serves them:
``SchedulerSide`` (policy, plus the engine control server for migration) or ``KVWorker``
(the KV server and the transfers). Once per step the scheduler side's decisions go to every
worker as ``PdConnectorMetadata`` (``StepOrders``), and each worker's transfer counters come
back as ``PdWorkerMeta``.

Hook contracts, as vLLM 0.32 calls them (see each method's docstring):

- scheduler role, EngineCore process, on the engine thread, from ``Scheduler``: never blocks
  on the network; decisions are queued for the step's metadata;
- worker role, each worker process, on the model runner's thread around ``execute_model``:
  never blocks on a transfer; the KV server and the transfers run on the worker's own
  threads (``KVWorker``).

Enable it with ``pdserve instance`` or by hand::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "PdConnector",
        "kv_connector_module_path": "pdserve.kv.connector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"pdserve": {"port": 7100}}}'
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    KVConnectorWorkerMetadata,
)

from pdserve.kv.layout import build_layout
from pdserve.kv.metadata import LoadOrder, StepOrders
from pdserve.kv.scheduler_side import SchedulerSide
from pdserve.kv.settings import KVSettings, from_extra_config
from pdserve.kv.worker_side import KVWorker, LoadResult
from pdserve.logs import get_logger
from pdserve.protocol.net import is_loopback
from pdserve.protocol.reports import TransferCounters
from pdserve.protocol.wire import cluster_secret

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = get_logger(__name__)


@dataclass
class PdConnectorMetadata(KVConnectorMetadata):
    """Scheduler → workers, every step: the orders of ``SchedulerSide.build_orders``."""

    orders: StepOrders = field(default_factory=StepOrders)


@dataclass
class PdWorkerMeta(KVConnectorWorkerMetadata):
    """Worker → scheduler, every step: transfer counters since the last step."""

    stats: TransferCounters = field(default_factory=TransferCounters)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        """vLLM's output aggregator sums the workers' metadata (TP ranks) into one."""
        if isinstance(other, PdWorkerMeta):
            return PdWorkerMeta(self.stats + other.stats)
        return PdWorkerMeta(self.stats)


class PdConnector(KVConnectorBase_V1):
    """vLLM's KV connector API, routed to ``SchedulerSide`` or ``KVWorker`` by role.

    Built by vLLM once per process and role: in the EngineCore (scheduler role, which also
    starts the engine control server when ``control_port`` is set) and in each worker
    (worker role; its KV server starts in ``register_kv_caches``).
    """

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.settings: KVSettings = from_extra_config(
            self._kv_transfer_config.kv_connector_extra_config
        )
        self.scheduler_side: SchedulerSide | None = None
        self.worker: KVWorker | None = None
        self._transfer_totals = TransferCounters()
        # This step's synchronous loads (started by bind_connector_metadata, waited for by
        # start_load_kv) and the blocks of those that failed, until vLLM asks for them.
        self._sync_loads: list[tuple[LoadOrder, Future[LoadResult]]] = []
        self._load_errors: set[int] = set()
        if role == KVConnectorRole.SCHEDULER:
            secret = cluster_secret(loopback_only=is_loopback(self.settings.host))
            self.scheduler_side = SchedulerSide(vllm_config, kv_cache_config, self.settings, secret)

    # --- scheduler role --------------------------------------------------------------------
    # All called by vLLM's Scheduler in the EngineCore process, on the engine thread.

    def _sched(self) -> SchedulerSide:
        assert self.scheduler_side is not None, "scheduler-side call on a worker connector"
        return self.scheduler_side

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """How many tokens beyond ``num_computed_tokens`` a waiting request loads from its
        source, and whether asynchronously (always, when it loads at all).

        Called by ``Scheduler.schedule`` each step a waiting request is considered for
        admission, so possibly several times per request; never returns None (no lookup
        is deferred). Side effects: in-memory only (an untrusted source queues a release
        for this step's metadata, once per request). No I/O, never blocks.
        """
        return self._sched().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        """Orders the load of a request that was just given blocks.

        Called by ``Scheduler.schedule`` for every request it allocates blocks to, once
        per allocation (for a loading request again after its load, with 0 external
        tokens, which orders nothing). Side effects: queues a ``LoadOrder`` for this step's
        metadata. No I/O, never blocks.
        """
        self._sched().update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """This step's orders for every worker, and a reset of what was queued.

        Called once per step at the end of ``Scheduler.schedule`` (also for empty steps).
        Side effects: answers the engine control commands (``Pin``/``Unpin``) that arrived
        since the last step, by queueing replies to the control server's I/O thread; reads
        the blocks of pinned requests from the cache manager. Never blocks on the network.
        """
        return PdConnectorMetadata(orders=self._sched().build_orders(scheduler_output))

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        """Once, from ``Scheduler.__init__``: the cache manager (read for pinned requests)."""
        super().bind_kv_cache_manager(kv_cache_manager)
        self._sched().bind(kv_cache_manager)

    def on_new_request(self, request: Request) -> None:
        """Once per request, from ``Scheduler.add_request``: remembers its gateway key.

        Side effects: in-memory only.
        """
        self._sched().on_new_request(request)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Whether to keep a finished request's blocks for a pull, and the params to return.

        Called by the scheduler exactly once per request when it finishes or is aborted,
        before its blocks are freed. Returns ``(True, {"pdserve": {"source": ...}})`` for a
        finished export request (its blocks are freed only once a worker reports the export
        pulled, released or expired), ``(True, None)`` for a pinned request (its blocks go to
        the live export), else ``(False, None)``. Side effects: queues an ``ExportOrder`` or
        ``ExportUpdate`` for the next step's metadata. No I/O, never blocks.
        """
        return self._sched().request_finished(request, block_ids)

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        """The cache groups a load restores: the one group this connector supports.

        Called by ``Scheduler.schedule`` after ``get_num_new_matched_tokens`` returned a
        positive count. No side effects.
        """
        return (0,)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Adds the workers' transfer counters of a step to the instance's totals.

        Called once per step by ``Scheduler.update_from_output`` with the output of all
        workers aggregated (``PdWorkerMeta.aggregate``). Side effects: in-memory only.
        """
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, PdWorkerMeta):
            self._transfer_totals = self._transfer_totals + meta.stats

    @property
    def transfer_counters(self) -> TransferCounters:
        """Cumulative counters of all workers, for the load report.

        Read by ``PdserveScheduler`` once per step, on the engine thread.
        """
        return self._transfer_totals

    # --- worker role -----------------------------------------------------------------------
    # All called in each worker process, on the model runner's thread.

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Starts this worker's KV server on its cache tensors.

        Called once per worker by the model runner when the KV cache is allocated, before
        the first step. Side effects: binds the KV server port (``port + tp_rank``), starts
        the messenger's I/O thread and the serving and loading thread pools. Pairs with peer
        workers form later, on demand.
        """
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        layout = build_layout(kv_caches, self._vllm_config.cache_config.num_gpu_blocks)
        secret = cluster_secret(loopback_only=is_loopback(self.settings.host))
        self.worker = KVWorker(self.settings, layout, get_tensor_model_parallel_rank(), secret)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Applies the scheduler side's orders of this step.

        Called once per step by the model runner before the forward pass. Side effects:
        registers and updates exports, submits loads to the loading threads, queues release
        messages to the messenger's thread. Never blocks on the network.
        """
        super().bind_connector_metadata(connector_metadata)
        if self.worker is None or not isinstance(connector_metadata, PdConnectorMetadata):
            return
        orders = connector_metadata.orders
        for export in orders.exports:
            self.worker.add_export(export)
        for update in orders.updates:
            self.worker.update_export(update)
        for load in orders.loads:
            if load.sync:
                self._sync_loads.append((load, self.worker.start_sync_load(load)))
            else:
                self.worker.start_load(load)
        for release in orders.releases:
            self.worker.send_release(release)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Once per step, before the forward when the step has synchronous loads (after it
        otherwise). Asynchronous loads already run in the background from the moment their
        order arrived (``bind_connector_metadata``); this waits for the step's synchronous
        ones, whose requests the forward computes on. Blocks the model thread for at most
        their transfer deadline; a failed one's blocks go to ``get_block_ids_with_load_errors``
        (vLLM then recomputes them, or fails the request under ``--on-kv-failure fail``).
        """
        loads, self._sync_loads = self._sync_loads, []
        for order, future in loads:
            if not future.result().ok:
                self._load_errors.update(order.dst)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Per layer, from the attention layers; nothing to wait for: ``start_load_kv``
        finished the synchronous loads, and an asynchronously loaded request is only
        scheduled once its whole load is reported done."""

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks of this step's synchronous loads that failed (then forgotten here).

        Called once per step by the model runner after ``get_transfer_results``; failed
        asynchronous loads are reported per request instead (``failed_recving``).
        """
        errors, self._load_errors = self._load_errors, set()
        return errors

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        """Per layer, from the attention layers; nothing to save: exporters keep the blocks
        and peers pull them."""

    def wait_for_save(self) -> None:
        """Once per step after the forward pass; nothing to wait for (see save_kv_layer)."""

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Exports finished (blocks may be freed) and loads finished or failed since the
        last call.

        Called once per step by the model runner after the forward pass. Side effects:
        expires exports whose lease passed; drains the worker's result queues, so each
        request is reported exactly once. Never blocks on the network.
        """
        if self.worker is None:
            return KVConnectorTransferResults()
        sending, recving, failed = self.worker.poll()
        return KVConnectorTransferResults(
            finished_sending=sending, finished_recving=recving, failed_recving=failed
        )

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        """This worker's transfer counters since the last step (None if nothing happened).

        Called once per step by the model runner, after ``get_transfer_results``. Side
        effects: resets the worker's counters. (What the worker *holds* does not travel
        here: steps stop when the engine idles, so the worker reports that itself, see
        ``KVWorker``'s holdings reporter.)
        """
        if self.worker is None:
            return None
        stats = self.worker.take_stats()
        return None if stats.is_zero() else PdWorkerMeta(stats)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """The older form of ``get_transfer_results`` (without failures), for its callers.

        vLLM 0.32's model runner calls ``get_transfer_results`` instead. It drains the same
        queues, so a caller uses one or the other, once per step.
        """
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending or None, results.finished_recving or None

    def shutdown(self) -> None:
        """Once per process at shutdown (scheduler or worker): stops the control server, or
        the KV server, its threads and every pair (aborting pending transfers)."""
        if self.scheduler_side is not None:
            self.scheduler_side.shutdown()
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None
