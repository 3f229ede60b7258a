"""What the gateway costs: TTFT and throughput through it vs straight to the same instance.

One ``both`` instance serves every request, so the only difference between the two paths is
the gateway (admission, scheduling, proxying the stream). The benchmark starts
``pdserve serve --prefill 0 --decode 0 --both 1`` (or uses a running gateway, ``--url``), finds
the instance's URL in ``GET /admin/instances``, and sends passes of the same shape (count,
prompt and output lengths, closed-loop concurrency) to both, interleaved: round k sends one
pass to each, the direct pass first in even rounds and the gateway pass first in odd ones
(ABBA ABBA ...), so a slow drift of the machine's speed cancels out of the comparison instead
of piling up on one side.

Every pass gets fresh random prompts: with the same prompts the pass that came second on the
same instance would hit vLLM's prefix cache. Lengths are exact (token-id prompts,
``ignore_eos``), so every pass asks for the same work.

Instances in a cluster only accept requests that carry a key derived from the cluster secret
(``pdserve.protocol.wire.instance_api_key``); the benchmark knows the secret of a cluster it
starts, and takes ``$PDSERVE_CLUSTER_SECRET`` for ``--url``.

    pdserve bench overhead --requests 32 --concurrency 4 --rounds 4 --json overhead.json
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from benchmark.client import ClientSettings, Target, drive, resolve_target
from benchmark.command import Bench, ClusterBenchSettings, report_cluster_bench, write_json
from benchmark.local_cluster import healthy, instances, local_cluster, secret_for
from pdserve.workload.arrivals import ClosedLoop
from pdserve.workload.metrics import LatencyStats, RequestRecord, Summary, latency_stats, summarize
from pdserve.workload.workloads import BenchRequest

Side = Literal["direct", "gateway"]
SIDES: tuple[Side, Side] = ("direct", "gateway")
# Seeds of the prompts: warm-up passes and measured passes never share one.
WARMUP_SEED_OFFSET = 10_000
PASS_SEED_OFFSET = 1


class OverheadSettings(ClusterBenchSettings):
    # What it shares with soak is in ClusterBenchSettings; these fields only look alike to
    # `duplicates` (Field declarations of the same shape), each is a setting of its own.
    requests: int = Field(32, ge=1, description="requests per pass (one pass = one side)")
    concurrency: int = Field(4, ge=1, description="requests in flight at once (closed loop)")
    output_tokens: int = Field(32, ge=1, description="tokens generated per request")
    rounds: int = Field(4, ge=1, description="rounds; each sends one pass direct, one via gateway")
    warmup_requests: int = Field(
        8, ge=0, description="unmeasured requests sent to each side before the first round"
    )
    target_pct: float = Field(
        5.0, ge=0, description="acceptable TTFT added by the gateway, percent of direct TTFT"
    )
    url: str | None = Field(
        None,
        description="a running gateway to measure (its cluster's $PDSERVE_CLUSTER_SECRET "
        "is needed); default: start pdserve serve --prefill 0 --decode 0 --both 1",
    )
    instance_url: str | None = Field(
        None, description="the instance to compare with (default: the only healthy instance)"
    )
    model: str | None = Field(
        None, description="model of the started instance (default: the bundled one)"
    )
    time_limit_s: float = Field(1800.0, gt=0, description="limit on one pass")


class PassResult(BaseModel):
    """One pass: which side, which round, its summary and its TTFT samples (seconds)."""

    side: Side
    round: int
    summary: Summary
    ttft_s: list[float]


class SideStats(BaseModel):
    """One side over every measured pass: TTFTs pooled, throughput over the summed time.

    Some fields are ``Summary``'s, but this is no ``Summary``: no SLOs, no ITL, several passes.
    """

    passes: int
    completed: int
    failed: int
    ttft_ms: LatencyStats
    request_throughput: float = Field(description="completed requests per second")
    output_throughput: float = Field(description="output tokens per second")


class Comparison(BaseModel):
    direct: SideStats
    gateway: SideStats
    ttft_mean_ratio: float | None = Field(description="gateway / direct mean TTFT")
    ttft_p50_ratio: float | None = Field(description="gateway / direct median TTFT")
    added_ttft_ms: float | None = Field(description="gateway - direct mean TTFT")
    added_ttft_pct: float | None = Field(description="(mean TTFT ratio - 1) x 100")
    throughput_ratio: float | None = Field(description="gateway / direct output tokens per s")
    round_ttft_ratios: list[float | None] = Field(
        description="gateway / direct mean TTFT of each round: their spread shows the noise"
    )
    target_pct: float
    within_target: bool | None = Field(description="added TTFT <= target_pct; None: no data")


def pass_order(rounds: int) -> list[tuple[int, Side]]:
    """(round, side) of every pass: ABBA ABBA ..., so linear drift cancels exactly."""
    order: list[tuple[int, Side]] = []
    for k in range(rounds):
        first, second = SIDES if k % 2 == 0 else SIDES[::-1]
        order += [(k, first), (k, second)]
    return order


def pass_requests(settings: OverheadSettings, seed: int, count: int) -> list[BenchRequest]:
    """``count`` requests of the set lengths, with random prompts drawn from ``seed``."""
    return settings.fixed_requests(count, seed)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def side_stats(passes: Sequence[PassResult]) -> SideStats:
    duration = sum(p.summary.duration_s for p in passes)
    completed = sum(p.summary.completed for p in passes)
    tokens = sum(p.summary.total_output_tokens for p in passes)
    return SideStats(
        passes=len(passes),
        completed=completed,
        failed=sum(p.summary.failed for p in passes),
        ttft_ms=latency_stats([t for p in passes for t in p.ttft_s]),
        request_throughput=completed / duration if duration > 0 else 0.0,
        output_throughput=tokens / duration if duration > 0 else 0.0,
    )


def compare(passes: Sequence[PassResult], target_pct: float) -> Comparison:
    """The two sides side by side; ratios are gateway over direct."""
    direct = side_stats([p for p in passes if p.side == "direct"])
    gateway = side_stats([p for p in passes if p.side == "gateway"])
    mean_ratio = _ratio(gateway.ttft_ms.mean, direct.ttft_ms.mean)
    rounds = sorted({p.round for p in passes})
    by_round = {(p.round, p.side): p.summary.ttft_ms.mean for p in passes}
    added = (
        gateway.ttft_ms.mean - direct.ttft_ms.mean
        if gateway.ttft_ms.mean is not None and direct.ttft_ms.mean is not None
        else None
    )
    added_pct = (mean_ratio - 1) * 100 if mean_ratio is not None else None
    return Comparison(
        direct=direct,
        gateway=gateway,
        ttft_mean_ratio=mean_ratio,
        ttft_p50_ratio=_ratio(gateway.ttft_ms.p50, direct.ttft_ms.p50),
        added_ttft_ms=added,
        added_ttft_pct=added_pct,
        throughput_ratio=_ratio(gateway.output_throughput, direct.output_throughput),
        round_ttft_ratios=[
            _ratio(by_round.get((k, "gateway")), by_round.get((k, "direct"))) for k in rounds
        ],
        target_pct=target_pct,
        within_target=None if added_pct is None else added_pct <= target_pct,
    )


def pick_instance(rows: Sequence[dict[str, Any]], url: str | None = None) -> dict[str, Any]:
    """The instance to compare with: ``url`` if given, else the only healthy one.

    With several instances the gateway would spread the load over them, and the comparison
    with one of them would flatter the gateway.
    """
    live = healthy(rows)
    if url is not None:
        for row in live:
            if row["url"].rstrip("/") == url.rstrip("/"):
                return row
        raise RuntimeError(f"no healthy instance at {url}: {[r['url'] for r in live]}")
    if len(live) != 1:
        raise RuntimeError(
            f"the gateway has {len(live)} healthy instances; the comparison needs exactly one "
            "(or --instance-url, with the others drained)"
        )
    return live[0]


async def run_pass(
    settings: OverheadSettings, target: Target, requests: Sequence[BenchRequest], label: str
) -> tuple[Summary, list[RequestRecord]]:
    outcome = await drive(
        target,
        requests,
        ClosedLoop(settings.concurrency),
        settings.time_limit_s,
        settings.progress,
        label,
    )
    return summarize(outcome.records, outcome.duration_s), outcome.records


async def measure(
    settings: OverheadSettings, direct: ClientSettings, gateway: ClientSettings
) -> list[PassResult]:
    """Warm-up, then every pass of ``pass_order``; the same model name on both sides."""
    gateway_target = await resolve_target(gateway)
    direct_target = await resolve_target(direct.model_copy(update={"model": gateway_target.model}))
    targets = {"direct": direct_target, "gateway": gateway_target}
    if settings.warmup_requests:
        for i, side in enumerate(SIDES):
            seed = settings.seed + WARMUP_SEED_OFFSET + i
            warmup = pass_requests(settings, seed, settings.warmup_requests)
            await run_pass(settings, targets[side], warmup, f"warm-up {side}")
    passes = []
    for i, (k, side) in enumerate(pass_order(settings.rounds)):
        requests = pass_requests(settings, settings.seed + PASS_SEED_OFFSET + i, settings.requests)
        summary, records = await run_pass(settings, targets[side], requests, f"round {k} {side}")
        ttfts = [r.ttft_s for r in records if r.success and r.ttft_s is not None]
        passes.append(PassResult(side=side, round=k, summary=summary, ttft_s=ttfts))
    return passes


def client_settings(
    settings: OverheadSettings, instance: dict[str, Any], gateway_url: str, secret: bytes
) -> tuple[ClientSettings, ClientSettings]:
    """(direct, gateway): the instance wants the key derived from the cluster secret."""
    from pdserve.protocol.wire import instance_api_key

    common = {"request_timeout_s": settings.request_timeout_s}
    direct = ClientSettings(url=instance["url"], api_key=instance_api_key(secret), **common)
    gateway = ClientSettings(url=gateway_url, api_key=settings.api_key, **common)
    return direct, gateway


async def run_against(
    settings: OverheadSettings, gateway_url: str, secret: bytes
) -> dict[str, Any]:
    instance = pick_instance(instances(gateway_url, settings.api_key), settings.instance_url)
    direct, gateway = client_settings(settings, instance, gateway_url, secret)
    passes = await measure(settings, direct, gateway)
    return {
        "settings": settings.model_dump(mode="json"),
        "gateway_url": gateway_url,
        "instance": {k: instance.get(k) for k in ("id", "role", "url", "model")},
        "comparison": compare(passes, settings.target_pct).model_dump(mode="json"),
        "passes": [p.model_dump(mode="json", exclude={"ttft_s"}) for p in passes],
    }


def serve_args(settings: OverheadSettings, vllm_args: Sequence[str]) -> list[str]:
    model = ["--model", settings.model] if settings.model else []
    return ["--prefill", "0", "--decode", "0", "--both", "1", *model, *vllm_args]


def run(settings: OverheadSettings, vllm_args: Sequence[str] = ()) -> dict[str, Any]:
    """Measures a running gateway (``settings.url``) or one started here; writes the JSON."""
    if settings.url:
        result = asyncio.run(run_against(settings, settings.url, secret_for(settings.url)))
    else:
        args = serve_args(settings, vllm_args)
        with local_cluster(args, 1, settings.log_dir, settings.start_timeout_s) as cluster:
            print(f"cluster ready: {cluster.url} (logs in {cluster.log_dir})", file=sys.stderr)
            result = asyncio.run(run_against(settings, cluster.url, cluster.secret))
            result["serve_args"] = args
    write_json(settings.json_out, result)
    return result


def _num(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def format_report(result: dict[str, Any]) -> str:
    c = Comparison.model_validate(result["comparison"])
    head = f"{'':8} {'done':>9} {'TTFT mean':>10} {'TTFT P50':>9} {'TTFT P99':>9} {'tok/s':>8} {'req/s':>7}"
    lines = [head, "-" * len(head)]
    for side, s in (("direct", c.direct), ("gateway", c.gateway)):
        lines.append(
            f"{side:8} {f'{s.completed}/{s.completed + s.failed}':>9} {_num(s.ttft_ms.mean):>10}"
            f" {_num(s.ttft_ms.p50):>9} {_num(s.ttft_ms.p99):>9} {s.output_throughput:>8.1f}"
            f" {s.request_throughput:>7.2f}"
        )
    verdict = {True: "within", False: "ABOVE", None: "no data for"}[c.within_target]
    rounds = " ".join(_num(r, 3) for r in c.round_ttft_ratios)
    lines += [
        "",
        f"gateway/direct: mean TTFT x{_num(c.ttft_mean_ratio, 3)}, median TTFT "
        f"x{_num(c.ttft_p50_ratio, 3)}, throughput x{_num(c.throughput_ratio, 3)}",
        f"added TTFT: {_num(c.added_ttft_ms, 2, ' ms')} ({_num(c.added_ttft_pct, 1, '%')}), "
        f"{verdict} the {c.target_pct:g}% target",
        f"mean TTFT ratio of each round: {rounds}",
        "TTFT in ms",
    ]
    return "\n".join(lines)


def ok(result: dict[str, Any]) -> bool:
    """Every request of every pass completed."""
    return all(p["summary"]["failed"] == 0 for p in result["passes"])


def report(settings: OverheadSettings, vllm_args: Sequence[str] = ()) -> int:
    """Runs, prints the report; exit status 1 if a request failed or nothing was measured."""
    return report_cluster_bench(
        "gateway overhead benchmark", settings, vllm_args, run, format_report, ok
    )


BENCH = Bench(OverheadSettings, lambda settings, extra, argv: report(settings, extra))


def main(argv: Sequence[str] | None = None) -> int:
    return BENCH.main(
        "python -m benchmark.gateway_overhead",
        "TTFT and throughput through the gateway vs straight to the same instance. "
        "Unknown arguments go to the started vLLM instance.",
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
