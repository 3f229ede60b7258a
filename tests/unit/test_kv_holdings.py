"""The leak gauges: what the KV data plane holds now, and how it reaches the load report."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import zmq

from pdserve.kv.holdings import HoldingsReporter
from pdserve.kv.settings import KVSettings
from pdserve.protocol.net import free_port
from pdserve.protocol.reports import ControlMessage, HoldingsReport, KVHoldings
from pdserve.protocol.wire import Codec
from tests.unit.test_control_plane import plane, register
from tests.unit.test_transport import SECRET, exporter, importer, load, wait_result  # noqa: F401


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


def test_a_worker_reports_its_holdings_itself_when_they_change() -> None:
    """No engine step needed: an idle engine takes none, and the gauge must still drop."""
    pull = zmq.Context.instance().socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    settings = KVSettings(
        instance_id="i",
        port=free_port(),
        control_address=f"tcp://127.0.0.1:{port}",
        report_interval_s=0.02,
        incarnation="inc",
    )
    state = {"holdings": KVHoldings(inflight_pulls=1)}
    reporter = HoldingsReporter(settings, 0, lambda: state["holdings"], SECRET)
    codec: Codec[Any] = Codec(ControlMessage, SECRET)
    try:
        assert pull.poll(2000)
        first = codec.decode(pull.recv_multipart())
        assert isinstance(first, HoldingsReport) and first.holdings.inflight_pulls == 1
        state["holdings"] = KVHoldings()
        deadline = time.monotonic() + 2
        last = first
        while last.holdings != KVHoldings() and time.monotonic() < deadline:
            assert pull.poll(2000)
            last = codec.decode(pull.recv_multipart())
        assert last.holdings == KVHoldings() and last.incarnation == "inc"
    finally:
        reporter.stop()
        pull.close(linger=0)


def test_the_control_plane_keeps_each_rank_of_the_current_incarnation() -> None:
    cp = plane()
    cp.handle(register("d", incarnation="now"), now=0.0)
    report = HoldingsReport(
        instance_id="d", rank=0, incarnation="now", holdings=KVHoldings(1, 2, 0)
    )
    cp.handle(report, now=0.1)
    cp.handle(msgspec.structs.replace(report, rank=1, holdings=KVHoldings(1, 1, 1)), now=0.1)
    cp.handle(msgspec.structs.replace(report, incarnation="old", holdings=KVHoldings(9, 9, 9)))
    assert cp.instances["d"].holdings() == KVHoldings(
        held_exports=1, open_pairs=3, inflight_pulls=1
    )


def test_admin_instances_and_the_gauges_show_each_instances_holdings() -> None:
    """What the leak checks read: /admin/instances and the pdserve_kv_* gauges, per instance
    (exports: the max over ranks, pairs and pulls: the sum)."""
    import httpx

    from tests.unit.gateway_harness import FakeInstance, LiveGateway
    from tests.unit.test_gateway_kv_faults import on_loop

    decode = FakeInstance("decode-0", "decode")
    with LiveGateway([FakeInstance("prefill-0", "prefill"), decode]) as gateway:
        incarnation = decode.registration().incarnation
        for rank, holdings in enumerate([KVHoldings(2, 1, 0), KVHoldings(1, 2, 1)]):
            report = HoldingsReport(
                instance_id="decode-0", rank=rank, incarnation=incarnation, holdings=holdings
            )
            on_loop(gateway, lambda r=report: gateway.ctx.control.handle(r))
        rows = {r["id"]: r for r in httpx.get(gateway.url + "/admin/instances").json()}
        metrics = httpx.get(gateway.url + "/metrics").text
    row = rows["decode-0"]
    assert (row["held_exports"], row["open_pairs"], row["inflight_pulls"]) == (2, 3, 1)
    assert (rows["prefill-0"]["held_exports"], rows["prefill-0"]["open_pairs"]) == (0, 0)
    labels = '{instance="decode-0",role="decode"}'
    for gauge, value in [("held_exports", 2), ("open_pairs", 3), ("inflight_pulls", 1)]:
        assert f"pdserve_kv_{gauge}{labels} {float(value)}" in metrics, gauge
