"""Benchmark metrics against numbers computed by hand."""

from __future__ import annotations

import pytest

from pdserve.workload.metrics import RequestRecord, latency_stats, meets_slo, summarize


def record(
    index: int, ttft: float, e2e: float, tokens: int, itl: list[float], success: bool = True
) -> RequestRecord:
    return RequestRecord(
        index=index,
        input_len=100,
        output_len=tokens,
        ttft_s=ttft,
        e2e_s=e2e,
        output_tokens=tokens,
        itl_s=itl,
        success=success,
        error="" if success else "boom",
    )


def test_tpot_follows_vllm_definition() -> None:
    # (e2e - ttft) / (tokens - 1) = (1.1 - 0.2) / (10 - 1) = 0.1 s
    assert record(0, 0.2, 1.1, 10, []).tpot_s == pytest.approx(0.1)
    assert record(0, 0.2, 0.2, 1, []).tpot_s is None


def test_percentiles_interpolate_linearly_in_ms() -> None:
    stats = latency_stats([0.001, 0.002, 0.003, 0.004])
    assert stats.n == 4
    assert stats.mean == pytest.approx(2.5)
    assert stats.p50 == pytest.approx(2.5)
    assert stats.p90 == pytest.approx(3.7)  # 1 + 0.9 * 3 = 3.7 ms
    assert stats.p99 == pytest.approx(3.97)
    assert latency_stats([]).mean is None


def test_summary_throughput_goodput_and_attainment() -> None:
    records = [
        record(0, 0.1, 1.0, 10, [0.1] * 9),  # TTFT 100 ms, TPOT 100 ms
        record(1, 0.3, 0.7, 5, [0.1] * 4),  # TTFT 300 ms, TPOT 100 ms
        record(2, 0.1, 2.1, 5, [0.5] * 4),  # TTFT 100 ms, TPOT 500 ms
        record(3, 0.0, 0.0, 0, [], success=False),
    ]
    s = summarize(records, duration_s=2.0, slo_ttft_ms=200, slo_tpot_ms=150)
    assert (s.requests_sent, s.completed, s.failed) == (4, 3, 1)
    assert s.request_throughput == pytest.approx(1.5)  # 3 completed / 2 s
    assert s.output_throughput == pytest.approx(10.0)  # 20 tokens / 2 s
    assert s.total_input_tokens == 300
    assert s.ttft_ms.mean == pytest.approx(500 / 3)  # (100 + 300 + 100) / 3
    assert s.tpot_ms.p50 == pytest.approx(100)
    assert s.itl_ms.n == 17 and s.itl_ms.mean == pytest.approx((0.9 + 0.4 + 2.0) / 17 * 1000)
    assert s.e2e_ms.p50 == pytest.approx(1000)
    # Only request 0 meets both SLOs: goodput 1 / 2 s, attainment 1 of 4 sent.
    assert s.goodput == pytest.approx(0.5)
    assert s.slo_attainment == pytest.approx(0.25)


def test_goodput_absent_without_slo_and_single_token_meets_tpot() -> None:
    assert summarize([record(0, 0.1, 0.1, 1, [])], 1.0).goodput is None
    assert meets_slo(record(0, 0.1, 0.1, 1, []), slo_ttft_ms=150, slo_tpot_ms=1)
    assert not meets_slo(record(0, 0.1, 0.1, 1, []), slo_ttft_ms=50)
    assert summarize([], 0.0, slo_ttft_ms=1).slo_attainment == 0.0
