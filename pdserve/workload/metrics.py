"""Per-request records and their summaries, with the definitions of ``vllm bench serve``.

Using vLLM's definitions makes pdserve's numbers directly comparable with numbers measured by
vLLM's own tool and reported in papers built on it:

* TTFT: arrival of the first streamed chunk with non-empty ``choices``, minus send time.
* ITL: gaps between successive non-empty-``choices`` chunks, pooled over all requests (a
  chunk that carries several tokens counts as one gap).
* E2E: arrival of the last non-empty-``choices`` chunk, minus send time.
* TPOT: (E2E − TTFT) / (output tokens − 1), per request; undefined for a single token.
* Throughputs: completed requests (output tokens) divided by the run's wall-clock duration.
* Goodput (DistServe): completed requests per second that meet every given SLO; SLO
  attainment is their fraction of all requests sent (a failed request misses its SLOs).

Percentiles are linear-interpolation percentiles (``numpy.percentile``), as in vLLM.
Everything is in seconds in the records and in milliseconds in the summaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

MS = 1000.0


class RequestRecord(BaseModel):
    """What the client observed for one request; filled in as the stream arrives."""

    index: int = Field(description="position of the request in the workload")
    input_len: int = Field(description="prompt tokens sent")
    output_len: int = Field(description="max_tokens asked for")
    start_s: float = Field(0.0, description="send time, seconds from the start of the run")
    ttft_s: float | None = Field(None, description="time to first token")
    itl_s: list[float] = Field(default_factory=list, description="gaps between chunks")
    e2e_s: float | None = Field(None, description="send to last chunk")
    output_tokens: int = Field(0, description="usage.completion_tokens, else chunk count")
    priority: int = Field(0, description="the workload's class: above 0 high priority")
    success: bool = False
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None when it is undefined."""
        if not self.success or self.ttft_s is None or self.e2e_s is None:
            return None
        if self.output_tokens <= 1:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


class LatencyStats(BaseModel):
    """Mean and percentiles in milliseconds; None where there is no sample."""

    n: int = 0
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


class Summary(BaseModel):
    """One load point of one system."""

    requests_sent: int
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int = Field(description="of completed requests")
    total_output_tokens: int = Field(description="of completed requests")
    request_throughput: float = Field(description="completed requests per second")
    output_throughput: float = Field(description="output tokens per second")
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2e_ms: LatencyStats
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    goodput: float | None = Field(None, description="req/s meeting every SLO; None if no SLO")
    slo_attainment: float | None = Field(None, description="fraction of requests sent")
    # Per priority class, only where the records have more than one (else left out).
    ttft_ms_high: LatencyStats | None = Field(
        None, description="TTFT of high-priority requests", exclude_if=lambda v: v is None
    )
    ttft_ms_normal: LatencyStats | None = Field(
        None, description="TTFT of the other requests", exclude_if=lambda v: v is None
    )


def latency_stats(seconds: Sequence[float]) -> LatencyStats:
    """Mean, P50, P90, P99 of samples given in seconds, reported in milliseconds."""
    if not seconds:
        return LatencyStats()
    values = np.asarray(seconds, dtype=float) * MS
    p50, p90, p99 = np.percentile(values, [50, 90, 99]).tolist()
    return LatencyStats(n=len(values), mean=float(values.mean()), p50=p50, p90=p90, p99=p99)


def meets_slo(
    record: RequestRecord, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None
) -> bool:
    """Whether a request succeeded within every given SLO.

    A one-token answer has no TPOT and so cannot miss a TPOT SLO.
    """
    if not record.success or record.ttft_s is None:
        return False
    if slo_ttft_ms is not None and record.ttft_s * MS > slo_ttft_ms:
        return False
    tpot = record.tpot_s
    return slo_tpot_ms is None or tpot is None or tpot * MS <= slo_tpot_ms


def _rate(count: float, duration_s: float) -> float:
    return count / duration_s if duration_s > 0 else 0.0


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> Summary:
    """The summary of one run's records; ``duration_s`` is the run's wall-clock time."""
    done = [r for r in records if r.success]
    ttfts = [(r.ttft_s, r.priority > 0) for r in done if r.ttft_s is not None]
    classes = any(r.priority > 0 for r in records) and any(r.priority <= 0 for r in records)
    output_tokens = sum(r.output_tokens for r in done)
    has_slo = slo_ttft_ms is not None or slo_tpot_ms is not None
    good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in records)
    return Summary(
        requests_sent=len(records),
        completed=len(done),
        failed=len(records) - len(done),
        duration_s=duration_s,
        total_input_tokens=sum(r.input_len for r in done),
        total_output_tokens=output_tokens,
        request_throughput=_rate(len(done), duration_s),
        output_throughput=_rate(output_tokens, duration_s),
        ttft_ms=latency_stats([t for t, _ in ttfts]),
        tpot_ms=latency_stats([t for r in done if (t := r.tpot_s) is not None]),
        itl_ms=latency_stats([gap for r in done for gap in r.itl_s]),
        e2e_ms=latency_stats([r.e2e_s for r in done if r.e2e_s is not None]),
        slo_ttft_ms=slo_ttft_ms,
        slo_tpot_ms=slo_tpot_ms,
        goodput=_rate(good, duration_s) if has_slo else None,
        slo_attainment=(good / len(records) if records else 0.0) if has_slo else None,
        ttft_ms_high=latency_stats([t for t, high in ttfts if high]) if classes else None,
        ttft_ms_normal=latency_stats([t for t, high in ttfts if not high]) if classes else None,
    )


class CacheStats(BaseModel):
    """Prefix caching and KV movement over one load point: what the servers' counters (or the
    simulator's block pools) counted between its start and its end, summed over instances.
    A count the servers do not expose is None."""

    prefix_cache_queries: float | None = Field(
        None, description="prompt tokens looked up in the prefix cache (vllm:prefix_cache_queries)"
    )
    prefix_cache_hits: float | None = Field(
        None, description="of them found cached (vllm:prefix_cache_hits)"
    )
    hit_rate: float | None = Field(None, description="hits / queries")
    kv_transfer_bytes: float | None = Field(
        None, description="KV bytes pulled between instances (pdserve_kv_received_bytes)"
    )

    @classmethod
    def of(cls, queries: float | None, hits: float | None, kv_bytes: float | None) -> CacheStats:
        rate = hits / queries if hits is not None and queries else None
        return cls(
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
            hit_rate=rate,
            kv_transfer_bytes=kv_bytes,
        )


class PointResult(BaseModel):
    """Everything measured at one load point of one system: the JSON file a run writes."""

    label: str = Field(description="name of the system under test, e.g. pdserve, vllm")
    arrival: str = Field(description="poisson, gamma or closed")
    load: float = Field(description="request rate (req/s) or, for closed, concurrency")
    model: str
    timed_out: bool = Field(description="whether the time limit cut the point short")
    settings: dict[str, Any]
    summary: Summary
    records: list[RequestRecord]
    # Left out where nothing was counted: such files keep the form they had before.
    cache: CacheStats | None = Field(
        None, description="None where nothing was counted", exclude_if=lambda v: v is None
    )
