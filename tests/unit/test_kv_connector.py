"""``PdConnector``'s scheduler-role hooks as vLLM's scheduler calls them, on fake requests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import pytest
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import RequestStatus

from pdserve.kv.connector import PdConnector, PdConnectorMetadata, PdWorkerMeta
from pdserve.kv.messages import parse_params
from pdserve.kv.metadata import ExportOrder, LoadOrder, ReleaseOrder, StepOrders
from pdserve.kv.worker_side import LoadResult
from pdserve.protocol.reports import TransferCounters
from tests.unit.kv_fakes import (
    FakeBlocks,
    FakeCacheManager,
    FakeRequest,
    FakeSchedulerOutput,
    decode_request,
    kv_cache_config,
    prefill_request,
    source_for,
    vllm_config,
)

TOKENS = list(range(10))


@pytest.fixture
def connector() -> Iterator[PdConnector]:
    connector = PdConnector(vllm_config(), KVConnectorRole.SCHEDULER, kv_cache_config())  # type: ignore[arg-type]
    connector.bind_kv_cache_manager(FakeCacheManager())  # type: ignore[arg-type]
    yield connector
    connector.shutdown()


def meta(connector: PdConnector) -> PdConnectorMetadata:
    built = connector.build_connector_meta(FakeSchedulerOutput())  # type: ignore[arg-type]
    assert isinstance(built, PdConnectorMetadata)
    return built


def test_the_scheduler_role_has_no_worker(connector: PdConnector) -> None:
    assert connector.scheduler_side is not None and connector.worker is None
    assert connector.get_loaded_kv_cache_group_ids(FakeRequest("x", TOKENS)) == (0,)  # type: ignore[arg-type]


def test_a_finished_prefill_goes_into_the_next_metadata(connector: PdConnector) -> None:
    request = prefill_request("req-p", TOKENS, "t1")
    connector.on_new_request(request)  # type: ignore[arg-type]
    request.status = RequestStatus.FINISHED_STOPPED
    request.num_computed_tokens = 10
    delay_free, params = connector.request_finished(request, [8, 9, 10])  # type: ignore[arg-type]
    assert delay_free
    parsed = parse_params(params)
    assert parsed is not None and parsed.source is not None
    orders = meta(connector).orders
    assert orders.exports == [ExportOrder("t1", "req-p", [8, 9, 10], 30.0, num_computed_tokens=10)]
    assert not orders.loads and not orders.releases and not orders.updates
    assert not meta(connector).orders, "the next step's metadata starts empty"


def test_an_aborted_prefill_frees_and_orders_nothing(connector: PdConnector) -> None:
    request = prefill_request("req-p", TOKENS, "t1")
    request.status = RequestStatus.FINISHED_ABORTED
    assert connector.request_finished(request, [8, 9, 10]) == (False, None)  # type: ignore[arg-type]
    assert not meta(connector).orders


def test_a_decode_request_asks_for_an_async_load(connector: PdConnector) -> None:
    assert connector.scheduler_side is not None
    prompt = list(range(100))  # more than sync_load_max_tokens (64)
    source = source_for(prompt, connector.scheduler_side.cache_fingerprint)
    request = decode_request("req-d", prompt, source)
    connector.on_new_request(request)  # type: ignore[arg-type]
    assert connector.get_num_new_matched_tokens(request, 0) == (100, True)  # type: ignore[arg-type]
    blocks = list(range(1, 27))  # 25 blocks of 4 hold positions 0..98; one more for 99
    connector.update_state_after_alloc(request, FakeBlocks(blocks), 100)  # type: ignore[arg-type]
    orders = meta(connector).orders
    assert orders.loads == [
        LoadOrder("req-d", "t1", source.addresses, 0, blocks[:25], needs_tokens=99)
    ]
    assert not orders.exports and not orders.releases


def test_a_short_load_is_synchronous(connector: PdConnector) -> None:
    assert connector.scheduler_side is not None
    source = source_for(TOKENS, connector.scheduler_side.cache_fingerprint)
    request = decode_request("req-d", TOKENS, source)
    connector.on_new_request(request)  # type: ignore[arg-type]
    assert connector.get_num_new_matched_tokens(request, 0) == (9, False)  # type: ignore[arg-type]
    connector.update_state_after_alloc(request, FakeBlocks([1, 2, 3]), 9)  # type: ignore[arg-type]
    (load,) = meta(connector).orders.loads
    assert load.sync and load.dst == [1, 2, 3]


class FakeSyncWorker:
    """Takes sync loads like ``KVWorker.start_sync_load``: a future per load."""

    def __init__(self, ok: bool) -> None:
        self.ok = ok
        self.started: list[LoadOrder] = []

    def start_sync_load(self, order: LoadOrder) -> Future[LoadResult]:
        self.started.append(order)
        future: Future[LoadResult] = Future()
        threading.Timer(0.05, future.set_result, [LoadResult(order.req_id, ok=self.ok)]).start()
        return future


@pytest.mark.parametrize("ok", [True, False])
def test_the_worker_finishes_sync_loads_before_the_forward(ok: bool) -> None:
    """``start_load_kv`` (called before the forward of a step with sync loads) returns only
    once they are done; the blocks of a failed one are reported once, for vLLM to recompute."""
    worker_role = PdConnector(vllm_config(), KVConnectorRole.WORKER, kv_cache_config())  # type: ignore[arg-type]
    fake = FakeSyncWorker(ok)
    worker_role.worker = fake  # type: ignore[assignment]
    order = LoadOrder("req-d", "t1", ["tcp://x:1"], 1, [6, 9], sync=True)
    worker_role.bind_connector_metadata(PdConnectorMetadata(StepOrders(loads=[order])))
    assert fake.started == [order]
    started = time.monotonic()
    worker_role.start_load_kv(None)  # type: ignore[arg-type]
    assert time.monotonic() - started >= 0.04, "returned before the load was done"
    assert worker_role.get_block_ids_with_load_errors() == (set() if ok else {6, 9})
    assert worker_role.get_block_ids_with_load_errors() == set()


def test_a_source_of_another_cache_is_released_in_the_metadata(connector: PdConnector) -> None:
    request = decode_request("req-d", TOKENS, source_for(TOKENS, "someone-else"))
    assert connector.get_num_new_matched_tokens(request, 0) == (0, False)  # type: ignore[arg-type]
    orders = meta(connector).orders
    assert orders.releases == [ReleaseOrder("t1", ["tcp://10.0.0.1:7100"])]
    assert not orders.loads


def test_worker_counters_add_up_into_the_transfer_totals(connector: PdConnector) -> None:
    rank0 = PdWorkerMeta(TransferCounters(loads_ok=1, bytes_received=100))
    rank1 = PdWorkerMeta(TransferCounters(loads_ok=2, bytes_sent=5))
    aggregated = rank0.aggregate(rank1)
    connector.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=aggregated))
    connector.update_connector_output(KVConnectorOutput())  # a step without transfers
    connector.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=rank0))
    assert connector.transfer_counters == TransferCounters(
        loads_ok=4, bytes_received=200, bytes_sent=5
    )
