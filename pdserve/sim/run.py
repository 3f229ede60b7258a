"""``pdserve sim``: a workload at each rate through a simulated cluster, summarised as a benchmark.

The requests are ``pdserve.workload.workloads.build_workload``'s, the arrival times
``pdserve.workload.arrivals.make_schedule``'s, and each request ends as a
``RequestRecord`` (send time, first token, every inter-token gap, last token) that
``pdserve.workload.metrics.summarize`` turns into the same summary ``pdserve bench run``
prints, with the same seeds per point (the workload's seed plus the point's index, the
arrivals' seed as given). A point adds what only a simulator can count cheaply:
preemptions, migrations, KV bytes moved, simulated and wall time, and the wall-clock time
of each decision of the real control plane.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.gateway.settings import GatewaySettings
from pdserve.scheduler.dispatch import DispatchSettings
from pdserve.scheduler.rescheduling import ReschedulingSettings
from pdserve.sim.cluster import SimCluster, roles_of
from pdserve.sim.conversation import conversation_chains
from pdserve.sim.gateway import Session, prefix_chain
from pdserve.sim.legs import EngineConfig
from pdserve.sim.prefix_events import RunKeys
from pdserve.sim.profile import StepProfile, load_profile
from pdserve.sim.settings import SimSettings
from pdserve.workload.arrivals import OpenLoop
from pdserve.workload.metrics import CacheStats, PointResult, RequestRecord, Summary, summarize
from pdserve.workload.workloads import (
    BenchRequest,
    build_workload,
    schedule_for,
    split_warmup,
    units,
)

LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


@dataclass
class SimPoint:
    """One simulated load point."""

    rate: float
    summary: Summary
    records: list[RequestRecord]
    preemptions: int = 0
    migrations: int = 0
    migrations_aborted: int = 0
    failovers: int = 0
    shed: int = 0  # refused by --shed-over-slo
    kv_transfer_bytes: int = 0
    cache: CacheStats = field(default_factory=CacheStats)
    simulated_s: float = 0.0
    wall_s: float = 0.0
    decision_us: dict[str, float | None] = field(default_factory=dict)
    events: int = 0
    leaks: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The point as ``--json`` writes it."""
        s = self.summary
        point: dict[str, Any] = {"rate": self.rate}
        for name in LATENCIES:
            stats = getattr(s, name)
            point[name] = {"mean": stats.mean, "p50": stats.p50, "p99": stats.p99}
        for name in ("ttft_ms_high", "ttft_ms_normal"):  # with two priority classes
            stats = getattr(s, name)
            if stats is not None:
                point[name] = {"mean": stats.mean, "p50": stats.p50, "p99": stats.p99, "n": stats.n}
        point.update(
            goodput_rps=s.goodput,
            slo_attainment=s.slo_attainment,
            completed=s.completed,
            failed=s.failed,
            request_throughput=s.request_throughput,
            output_throughput=s.output_throughput,
            preemptions=self.preemptions,
            migrations=self.migrations,
            migrations_aborted=self.migrations_aborted,
            failovers=self.failovers,
            shed=self.shed,
            kv_transfer_bytes=self.kv_transfer_bytes,
            prefix_cache_queries=self.cache.prefix_cache_queries,
            prefix_cache_hits=self.cache.prefix_cache_hits,
            prefix_cache_hit_rate=self.cache.hit_rate,
            simulated_s=self.simulated_s,
            wall_s=self.wall_s,
            speedup=self.simulated_s / self.wall_s if self.wall_s > 0 else None,
            decision_us=self.decision_us,
            events=self.events,
            leaks=self.leaks,
        )
        return point


def decision_stats(nanoseconds: Sequence[int]) -> dict[str, float | None]:
    """Mean, P50 and P99 of the control plane's decisions, in microseconds."""
    if not nanoseconds:
        return {"mean": None, "p50": None, "p99": None, "n": 0}
    us = np.asarray(nanoseconds, dtype=float) / 1e3
    p50, p99 = np.percentile(us, [50, 99]).tolist()
    return {"mean": float(us.mean()), "p50": p50, "p99": p99, "n": len(us)}


def sessions_for(
    requests: Sequence[BenchRequest],
    times: Sequence[float],
    block_size: int,
    key_prefix: str = "req",
    token_ids: bool = False,
) -> list[Session]:
    """One gateway session per request, arriving at its send time; a conversation's first
    turn at the conversation's start (``times`` has one per ``units``), each later turn
    after the turn before it (``next_turn``); ``token_ids``: the prompts' ids go with them
    (for the prefix index)."""
    if any(r.conversation is not None for r in requests):
        chains = conversation_chains(requests, block_size)
    else:
        chains = [prefix_chain(r, block_size) for r in requests]
    sessions = [
        Session(
            index=i,
            key=f"{key_prefix}-{i:06d}",
            input_len=r.input_len,
            output_len=r.output_len,
            start_s=0.0,
            chain=chain,
            token_ids=tuple(r.prompt) if token_ids and isinstance(r.prompt, list) else None,
            think_s=r.think_s,
            priority=r.priority,
        )
        for i, (r, chain) in enumerate(zip(requests, chains, strict=True))
    ]
    groups = units(requests)
    for group, start in zip(groups, times, strict=True):
        sessions[group[0]].start_s = start
        for earlier, later in itertools.pairwise(group):
            sessions[earlier].next_turn = sessions[later]
            sessions[later].follows = True
    return sessions


def build_cluster(
    settings: SimSettings,
    profile: StepProfile,
    dispatch: DispatchSettings,
    rescheduling: ReschedulingSettings,
    gateway: GatewaySettings,
) -> SimCluster:
    engine = EngineConfig.of(
        profile,
        num_blocks=settings.num_blocks,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        watermark=settings.kv_watermark,
        prefix_caching=settings.prefix_caching,
        priority_scheduling=settings.priority_scheduling,
    )
    return SimCluster(
        profile,
        roles_of(settings.prefill, settings.decode, settings.both),
        gateway=gateway,
        dispatch=dispatch,
        rescheduling=rescheduling,
        engine=engine,
        report_interval_s=settings.report_interval_s,
        changes=settings.changes(),
        seed=settings.seed,
    )


def index_runs(
    runs: RunKeys,
    requests: Sequence[BenchRequest],
    sessions: Sequence[Session],
    block_size: int,
) -> None:
    """The chain keys of every run the sessions' chains name, from their token ids: a
    conversation's from its last turn's prompt and a synthetic answer (its earlier turns'
    runs are prefixes of it), any other request's from its prompt."""
    for group in units(requests):
        last = requests[group[-1]]
        if not isinstance(last.prompt, list):
            continue
        answer = [0] * last.output_len if last.conversation is not None else []
        runs.add(sessions[group[-1]].chain, [*last.prompt, *answer], block_size)


COUNTED = ("preemptions", "bytes_received", "prefix_queries", "prefix_hits")


def engine_totals(cluster: SimCluster) -> Counter[str]:
    """The engines' counters that a point reports, summed (failed engines included)."""
    totals: Counter[str] = Counter()
    for engine in cluster.engines.values():
        for name in COUNTED:
            totals[name] += getattr(engine.counters, name)
    return totals


def warm_up(cluster: SimCluster, sessions: Sequence[Session]) -> Counter[str]:
    """Serves the warm-up sessions, all sent at once; the point's own clock starts one
    report interval after the last ended. Returns the counters by then (not the point's),
    and forgets the warm-up's decision times."""
    if sessions:
        cluster.run(sessions)
        cluster.warmup_s = cluster.queue.now + cluster.report_interval_s
        cluster.gateway.counters.decision_ns.clear()
    return engine_totals(cluster)


def point_requests(
    settings: SimSettings, index: int
) -> tuple[list[BenchRequest], list[BenchRequest]]:
    """The warm-up and the measured requests of the point at ``index`` of ``--rate``: the
    workload's seed plus the index, as ``pdserve bench run`` seeds its points."""
    return split_warmup(build_workload(settings.model_copy(update={"seed": settings.seed + index})))


def simulate_point(
    settings: SimSettings,
    profile: StepProfile,
    dispatch: DispatchSettings,
    rescheduling: ReschedulingSettings,
    gateway: GatewaySettings,
    rate: float,
    index: int = 0,
) -> SimPoint:
    """One rate: a fresh cluster, the workload's requests (its warm-up first, unmeasured, as
    ``pdserve bench run`` sends it), every request's record."""
    warm, requests = point_requests(settings, index)
    schedule = schedule_for(requests, settings.arrival, rate, settings.burstiness, settings.seed)
    assert isinstance(schedule, OpenLoop)
    started = time.perf_counter()
    cluster = build_cluster(settings, profile, dispatch, rescheduling, gateway)
    block_size = cluster.engine_config.block_size
    # The prompts' ids for a policy that matches them, the runs' keys for the engines' events.
    ids = cluster.control.prefix.enabled
    warming = sessions_for(warm, [0.0] * len(warm), block_size, "warm", ids)
    sessions = sessions_for(requests, schedule.times, block_size, token_ids=ids)
    if cluster.outbox is not None:
        index_runs(cluster.runs, [*warm, *requests], [*warming, *sessions], block_size)
    before = warm_up(cluster, warming)
    simulated = cluster.run(sessions)
    wall = time.perf_counter() - started
    records = [s.record() for s in sessions]
    counted = engine_totals(cluster) - before
    migrations = cluster.rescheduler.counters
    return SimPoint(
        rate=rate,
        summary=summarize(records, simulated, dispatch.slo.ttft_ms, dispatch.slo.tpot_ms),
        records=records,
        preemptions=counted["preemptions"],
        migrations=migrations.completed,
        migrations_aborted=len(migrations.records) - migrations.completed,
        failovers=cluster.gateway.counters.failovers,
        shed=cluster.gateway.counters.shed,
        kv_transfer_bytes=counted["bytes_received"],
        cache=CacheStats.of(
            counted["prefix_queries"], counted["prefix_hits"], counted["bytes_received"]
        ),
        simulated_s=simulated,
        wall_s=wall,
        decision_us=decision_stats(cluster.gateway.counters.decision_ns),
        events=cluster.queue.processed,
        leaks=cluster.leaks(),
    )


def label_of(settings: SimSettings, dispatch: DispatchSettings, resched: bool) -> str:
    return settings.label or dispatch.policy + ("+rescheduling" if resched else "")


def point_result(point: SimPoint, settings: SimSettings, label: str, model: str) -> PointResult:
    """The point as a benchmark result file, for ``benchmark.plots``."""
    return PointResult(
        label=label,
        arrival=settings.arrival,
        load=point.rate,
        model=model,
        timed_out=False,
        settings=settings.model_dump(mode="json"),
        summary=point.summary,
        records=point.records,
        cache=point.cache,
    )


def simulate(
    settings: SimSettings,
    dispatch: DispatchSettings,
    rescheduling: ReschedulingSettings,
    gateway: GatewaySettings,
) -> tuple[StepProfile, list[SimPoint]]:
    profile = load_profile(settings.profile)
    points = [
        simulate_point(settings, profile, dispatch, rescheduling, gateway, rate, index)
        for index, rate in enumerate(settings.rate)
    ]
    return profile, points


def report_json(
    settings: SimSettings,
    dispatch: DispatchSettings,
    rescheduling: ReschedulingSettings,
    gateway: GatewaySettings,
    profile: StepProfile,
    points: Sequence[SimPoint],
) -> dict[str, Any]:
    return {
        "label": label_of(settings, dispatch, rescheduling.rescheduling),
        "profile": {"name": profile.name, "source": profile.source},
        "settings": {
            "sim": settings.model_dump(mode="json"),
            "dispatch": dispatch.model_dump(mode="json"),
            "rescheduling": rescheduling.model_dump(mode="json"),
            "gateway": gateway.model_dump(mode="json"),
        },
        "points": [p.as_json() for p in points],
    }


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(points: Sequence[SimPoint]) -> str:
    head = (
        f"{'rate':>6} {'done':>11} {'TTFT':>8} {'P99':>8} {'TPOT':>7} {'P99':>7}"
        f" {'goodput':>8} {'preempt':>8} {'migr':>5} {'hit %':>6} {'sim s':>8} {'x real':>8}"
        f" {'dec us':>7}"
    )
    lines = [head, "-" * len(head)]
    for p in points:
        s = p.summary
        speed = p.simulated_s / p.wall_s if p.wall_s > 0 else None
        hit_rate = None if p.cache.hit_rate is None else 100 * p.cache.hit_rate
        lines.append(
            f"{p.rate:>6g} {f'{s.completed}/{s.requests_sent}':>11}"
            f" {_cell(s.ttft_ms.mean):>8} {_cell(s.ttft_ms.p99):>8}"
            f" {_cell(s.tpot_ms.mean):>7} {_cell(s.tpot_ms.p99):>7}"
            f" {_cell(s.goodput, 2):>8} {p.preemptions:>8} {p.migrations:>5}"
            f" {_cell(hit_rate, 1):>6}"
            f" {p.simulated_s:>8.1f} {_cell(speed, 0):>8} {_cell(p.decision_us['p50']):>7}"
        )
    return "\n".join(
        [
            *lines,
            "latencies in ms (TTFT/TPOT without P: means); hit %: prefix-cache hit "
            "rate (tokens); dec us: P50",
            *_class_lines(points),
        ]
    )


def _class_lines(points: Sequence[SimPoint]) -> list[str]:
    """Per rate, each priority class's TTFT and the requests shed, where there are any."""
    lines = []
    for p in points:
        high, normal = p.summary.ttft_ms_high, p.summary.ttft_ms_normal
        if high is None and normal is None and not p.shed:
            continue
        text = f"{p.rate:>6g}"
        for name, stats in (("high", high), ("normal", normal)):
            if stats is not None:
                mean, p99 = _cell(stats.mean), _cell(stats.p99)
                text += f"  TTFT {name} (n {stats.n}) mean {mean} P99 {p99}"
        lines.append(text + f"  shed {p.shed}")
    return lines


def write_json(path: str, result: dict[str, Any]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return out


def command(
    settings: SimSettings,
    dispatch: DispatchSettings,
    rescheduling: ReschedulingSettings,
    gateway: GatewaySettings,
) -> tuple[int, list[PointResult]]:
    """``pdserve sim``: runs the sweep, prints its table, writes ``--json``; returns the exit
    status and the points as benchmark results (the door draws ``--plot`` from them)."""
    logging.getLogger("pdserve.gateway.control_plane").setLevel(logging.WARNING)
    try:
        profile, points = simulate(settings, dispatch, rescheduling, gateway)
    except ValueError as error:
        print(f"pdserve sim: {error}", file=sys.stderr)
        return 2, []
    print(format_table(points))
    if settings.json_out:
        result = report_json(settings, dispatch, rescheduling, gateway, profile, points)
        print(write_json(settings.json_out, result))
    leaks = [leak for p in points for leak in p.leaks]
    if leaks:
        print(f"pdserve sim: the simulation leaked: {leaks}", file=sys.stderr)
    label = label_of(settings, dispatch, rescheduling.rescheduling)
    model = profile.model or profile.name
    results = [point_result(p, settings, label, model) for p in points]
    return (1 if leaks else 0), results
