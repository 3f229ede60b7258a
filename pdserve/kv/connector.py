"""``PdConnector``: pdserve's KV connector, loaded by vLLM through ``kv_connector_module_path``.

vLLM builds one connector object per role: in the EngineCore process (scheduler role) and in
every worker (worker role). This class only routes vLLM's calls to the half that serves them:
``SchedulerSide`` (policy, no I/O) or ``KVWorker`` (the KV server and the transfers).

Enable it with ``pdserve instance`` or by hand::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "PdConnector",
        "kv_connector_module_path": "pdserve.kv.connector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"pdserve": {"port": 7100}}}'
"""

from __future__ import annotations

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
from pdserve.kv.scheduler_side import SchedulerSide, StepOrders
from pdserve.kv.settings import KVSettings, from_extra_config
from pdserve.kv.worker_side import KVWorker, TransferStats
from pdserve.logs import get_logger
from pdserve.protocol.net import is_loopback
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

    from pdserve.protocol.reports import TransferCounters

logger = get_logger(__name__)


@dataclass
class PdConnectorMetadata(KVConnectorMetadata):
    orders: StepOrders = field(default_factory=StepOrders)


@dataclass
class PdWorkerMeta(KVConnectorWorkerMetadata):
    """Worker → scheduler, every step: transfer counters since the last step."""

    stats: TransferStats = field(default_factory=TransferStats)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        merged = TransferStats()
        merged.merge(self.stats)
        if isinstance(other, PdWorkerMeta):
            merged.merge(other.stats)
        return PdWorkerMeta(merged)


class PdConnector(KVConnectorBase_V1):
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
        self._transfer_totals = TransferStats()
        if role == KVConnectorRole.SCHEDULER:
            secret = cluster_secret(loopback_only=is_loopback(self.settings.host))
            self.scheduler_side = SchedulerSide(vllm_config, kv_cache_config, self.settings, secret)

    # --- scheduler role --------------------------------------------------------------------

    def _sched(self) -> SchedulerSide:
        assert self.scheduler_side is not None, "scheduler-side call on a worker connector"
        return self.scheduler_side

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._sched().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self._sched().update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return PdConnectorMetadata(orders=self._sched().build_orders(scheduler_output))

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self._sched().bind(kv_cache_manager)

    def on_new_request(self, request: Request) -> None:
        self._sched().on_new_request(request)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self._sched().request_finished(request, block_ids)

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        return (0,)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, PdWorkerMeta):
            self._transfer_totals.merge(meta.stats)

    @property
    def transfer_counters(self) -> TransferCounters:
        """Cumulative counters of all workers, for the load report."""
        from dataclasses import asdict

        from pdserve.protocol.reports import TransferCounters

        return TransferCounters(**asdict(self._transfer_totals))

    # --- worker role -----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        layout = build_layout(kv_caches, self._vllm_config.cache_config.num_gpu_blocks)
        secret = cluster_secret(loopback_only=is_loopback(self.settings.host))
        self.worker = KVWorker(self.settings, layout, get_tensor_model_parallel_rank(), secret)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.worker is None or not isinstance(connector_metadata, PdConnectorMetadata):
            return
        orders = connector_metadata.orders
        for export in orders.exports:
            self.worker.add_export(export)
        for update in orders.updates:
            self.worker.update_export(update)
        for load in orders.loads:
            self.worker.start_load(load)
        for release in orders.releases:
            self.worker.send_release(release)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Loads run in the background from the moment their order arrives."""

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loaded requests are only scheduled once their whole load is reported done."""

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        """Nothing to save: exporters keep the blocks and peers pull them."""

    def wait_for_save(self) -> None:
        """Nothing to wait for (see save_kv_layer)."""

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        if self.worker is None:
            return KVConnectorTransferResults()
        sending, recving, failed = self.worker.poll()
        return KVConnectorTransferResults(
            finished_sending=sending, finished_recving=recving, failed_recving=failed
        )

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if self.worker is None:
            return None
        stats = self.worker.take_stats()
        return PdWorkerMeta(stats) if stats != TransferStats() else None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending or None, results.finished_recving or None

    def shutdown(self) -> None:
        if self.scheduler_side is not None:
            self.scheduler_side.shutdown()
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None
