"""The leak gauges: what the KV data plane holds now, and how it reaches the load report."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from pdserve.kv.connector import PdConnector, PdWorkerMeta
from pdserve.protocol.reports import KVHoldings, TransferCounters
from tests.unit.test_transport import exporter, importer, load, wait_result  # noqa: F401


def test_an_importer_holds_one_pair_and_nothing_else_after_pulls(exporter: Any) -> None:  # noqa: F811
    port, commands, replies = exporter
    worker, _ = importer()
    try:
        assert worker.holdings() == KVHoldings()
        address = f"tcp://127.0.0.1:{port}"
        for n in range(3):
            commands.put(("export", f"t{n}", f"p{n}", [n], 30))
            worker.start_load(load(f"d{n}", f"t{n}", address, 0, [10 + n]))
            done, failed = wait_result(worker)
            assert done == {f"d{n}"} and not failed
        assert worker.holdings() == KVHoldings(held_exports=0, open_pairs=1, inflight_pulls=0)
        commands.put(("finished", 1.0))
        assert replies.get(timeout=10) == ["p0", "p1", "p2"]
    finally:
        worker.shutdown()


def test_tensor_parallel_ranks_combine() -> None:
    a = KVHoldings(held_exports=2, open_pairs=1, inflight_pulls=1)
    b = KVHoldings(held_exports=2, open_pairs=3, inflight_pulls=0)
    assert a.combine(b) == KVHoldings(held_exports=2, open_pairs=4, inflight_pulls=1)
    merged = PdWorkerMeta(TransferCounters(loads_ok=1), a).aggregate(PdWorkerMeta(holdings=None))
    assert isinstance(merged, PdWorkerMeta) and merged.holdings == a
    assert merged.stats.loads_ok == 1


def _worker_connector(worker: Any) -> PdConnector:
    connector = PdConnector.__new__(PdConnector)  # the worker role's state, without vLLM
    connector.worker = worker
    connector._sent_holdings = None
    return connector


def test_holdings_are_sent_when_they_change_and_only_then() -> None:
    state = {"holdings": KVHoldings(held_exports=1)}
    worker = SimpleNamespace(take_stats=TransferCounters, holdings=lambda: state["holdings"])
    connector = _worker_connector(worker)
    first = connector.build_connector_worker_meta()
    assert isinstance(first, PdWorkerMeta) and first.holdings == KVHoldings(held_exports=1)
    assert connector.build_connector_worker_meta() is None  # unchanged, nothing to say
    state["holdings"] = KVHoldings()
    last = connector.build_connector_worker_meta()
    assert isinstance(last, PdWorkerMeta) and last.holdings == KVHoldings()
