"""Priorities in the benchmark (issue 13's priority run): ``-prio`` setups start vLLM's priority
scheduling and are the only ones the client sends priorities to; each point reports the TTFT
of each class, and the comparison gives each class's ratio on its own request count."""

from __future__ import annotations

from benchmark import compare
from benchmark.client import Target
from benchmark.setups import parse_setup
from pdserve.workload.metrics import LatencyStats, RequestRecord, Summary, summarize
from pdserve.workload.workloads import BenchRequest
from tests.unit.test_bench_compare import plan


def target(send_priority: bool) -> Target:
    return Target("http://x/v1/completions", {}, "m", 0.0, True, 60.0, send_priority)


def test_a_prio_setup_turns_on_vllms_priority_scheduling() -> None:
    on = parse_setup("pdserve-adaptive-prio", 2)
    assert (on.policy, on.both, on.priorities, on.rescheduling) == ("adaptive", 2, True, False)
    split = parse_setup("pdserve-1p1d-resched-prio", 2)
    assert (split.prefill, split.decode, split.rescheduling, split.priorities) == (1, 1, True, True)
    assert not parse_setup("pdserve-adaptive", 2).priorities
    assert "--priority-scheduling" in plan("pdserve-adaptive-prio").processes[0].argv
    assert "--priority-scheduling" not in plan("pdserve-adaptive").processes[0].argv
    assert "priorities" in on.describe()


def test_the_client_sends_a_high_priority_in_vllms_convention_only_when_asked() -> None:
    high = BenchRequest([1, 2], 2, 4, priority=1)
    normal = BenchRequest([1, 2], 2, 4)
    assert target(True).payload(high)["priority"] == -1
    assert "priority" not in target(True).payload(normal)
    assert "priority" not in target(False).payload(high)


def record(index: int, ttft_s: float, priority: int) -> RequestRecord:
    return RequestRecord(
        index=index, input_len=2, output_len=4, ttft_s=ttft_s, e2e_s=ttft_s + 1,
        output_tokens=4, success=True, priority=priority,
    )  # fmt: skip


def test_a_point_reports_each_class_ttft_only_where_there_are_classes() -> None:
    records = [record(i, 0.1 * (i + 1), 1 if i < 2 else 0) for i in range(5)]
    summary = summarize(records, 10.0)
    assert summary.ttft_ms_high is not None and summary.ttft_ms_normal is not None
    assert summary.ttft_ms_high.n == 2 and summary.ttft_ms_high.mean == 150.0
    assert summary.ttft_ms_normal.n == 3 and summary.ttft_ms_normal.mean == 400.0
    alike = summarize([record(i, 0.1, 0) for i in range(3)], 10.0)
    assert alike.ttft_ms_high is None and alike.ttft_ms_normal is None
    assert "ttft_ms_high" not in alike.model_dump()  # points without classes keep their form


def _summary(high_p99: float | None, normal_p99: float, high_n: int = 150) -> Summary:
    stats = LatencyStats(n=400, mean=1.0, p99=500.0)
    return Summary(
        requests_sent=400, completed=400, failed=0, duration_s=10.0, total_input_tokens=0,
        total_output_tokens=0, request_throughput=1.0, output_throughput=1.0, ttft_ms=stats,
        tpot_ms=stats, itl_ms=stats, e2e_ms=stats,
        ttft_ms_high=None if high_p99 is None else LatencyStats(n=high_n, p99=high_p99),
        ttft_ms_normal=None if high_p99 is None else LatencyStats(n=250, p99=normal_p99),
    )  # fmt: skip


def _entry(name: str, rep: int, summary: Summary) -> compare.SetupResult:
    spec = parse_setup(name, 2)
    return compare.SetupResult(
        name=name,
        repetition=rep,
        spec={"prefill": spec.prefill, "decode": spec.decode, "both": spec.both},
        points=[{"load": 1.0, "summary": summary}],
    )


def test_each_class_gets_its_ratio_on_its_own_request_count() -> None:
    on, off = "pdserve-adaptive-prio", "pdserve-adaptive"
    setups = [
        entry
        for rep in (1, 2, 3)
        for entry in (
            _entry(on, rep, _summary(100.0 * rep, 520.0, high_n=150 if rep < 3 else 60)),
            _entry(off, rep, _summary(200.0 * rep, 500.0)),
        )
    ]
    rows = {r.metric: r for r in compare.repeated_ratios(setups, on, goodput=False)}
    high = rows["high-priority TTFT P99"]
    assert high.ratios == [0.5, 0.5, 0.5] and high.min_requests == 60
    assert high.outcome is compare.Outcome.TOO_FEW_REQUESTS  # a P99 of 60 requests
    assert rows["normal TTFT P99"].ratios == [1.04, 1.04, 1.04]
    plain = [_entry(n, rep, _summary(None, 0.0)) for rep in (1, 2, 3) for n in (on, off)]
    metrics = {r.metric for r in compare.repeated_ratios(plain, on, goodput=False)}
    assert "TTFT P99" in metrics and not {"high-priority TTFT P99", "normal TTFT P99"} & metrics
