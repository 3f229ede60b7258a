"""Soak test: steady load at a fraction of measured capacity, watching for slow failures.

Leaks and drifts show only over time: KV blocks that are never given back, memory that grows
with every request, errors that start after an hour. The soak test

1. starts ``pdserve serve`` with the given flags (or uses a running gateway, ``--url``);
2. probes capacity: ``--probe-requests`` at a closed-loop ``--probe-concurrency``, whose
   completed requests per second are the capacity;
3. sends Poisson arrivals at ``--fraction`` of that rate for ``--minutes``, fresh random
   prompts of fixed lengths (so the prefix cache cannot hide anything), and samples every
   ``--sample-interval-s``: requests sent, completed, failed by kind, in flight; each
   instance's used KV blocks (``GET /admin/instances``, from the load reports that instances
   send every 100 ms); the RSS of every process of the cluster (the launcher's process tree,
   or for ``--url`` the local instances' trees from the ``pid`` column plus the process that
   listens on the gateway's port);
4. after the last response, waits up to ``--drain-timeout-s`` for every instance's used
   blocks to return to 0 (a prefill whose KV was never pulled keeps it for the instance's
   ``--kv-lease-s``, 30 s by default, so the timeout should be longer), then reports blocks
   still held (leaked), memory growth per process between the first sample after
   ``--warmup-s`` and the last one, and the totals; writes everything to ``--json``.

Exit status 0 when nothing leaked, the error rate is at most ``--max-error-rate`` and no
process grew by more than ``--max-rss-growth-mib``. Not part of CI: it runs for minutes.

    pdserve bench soak --minutes 10 --fraction 0.7 --json soak.json --prefill 1 --decode 1
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import socket
import sys
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from pydantic import BaseModel, Field

from benchmark.client import ClientSettings, Target, drive, resolve_target, send
from benchmark.command import Bench, ClusterBenchSettings, report_cluster_bench, write_json
from benchmark.local_cluster import (
    LocalCluster,
    expected_instances,
    healthy,
    instances,
    local_cluster,
)
from pdserve.workload.arrivals import ClosedLoop, poisson_times
from pdserve.workload.metrics import RequestRecord, Summary, latency_stats, summarize

MIB = 1024 * 1024
PROBE_SEED_OFFSET = 7_919
DRAIN_POLL_S = 1.0

Phase = Literal["load", "drain"]


class SoakSettings(ClusterBenchSettings):
    # Like OverheadSettings: the shared fields are in ClusterBenchSettings, these are its own.
    minutes: float = Field(10.0, gt=0, description="duration of the steady load")
    fraction: float = Field(0.7, gt=0, description="load as a fraction of measured capacity")
    probe_concurrency: int = Field(8, ge=1, description="closed-loop concurrency of the probe")
    probe_requests: int = Field(32, ge=1, description="requests of the capacity probe")
    sample_interval_s: float = Field(5.0, gt=0, description="seconds between samples")
    warmup_s: float = Field(
        60.0, ge=0, description="samples before this (from the start of the load) are no baseline"
    )
    drain_timeout_s: float = Field(
        60.0, gt=0, description="after the load, seconds for every instance's KV to be freed"
    )
    max_error_rate: float = Field(0.0, ge=0, le=1, description="failed / sent that still passes")
    max_rss_growth_mib: float = Field(
        200.0, gt=0, description="growth of any process (after warm-up) that still passes"
    )
    url: str | None = Field(
        None,
        description="a running gateway to soak (default: start pdserve serve with the "
        "remaining flags, e.g. --prefill 1 --decode 1 --max-num-seqs 16)",
    )
    request_timeout_s: float = Field(300.0, gt=0, description="limit on one request")


# --- what a sample holds ------------------------------------------------------------------


class InstanceSample(BaseModel):
    id: str
    role: str | None = None
    healthy: bool = False
    used_blocks: int | None = None
    total_blocks: int | None = None
    num_running: int = 0
    num_waiting: int = 0


class Sample(BaseModel):
    t_s: float = Field(description="seconds since the start of the load")
    phase: Phase
    sent: int
    completed: int
    failed: int
    in_flight: int
    errors: dict[str, int]
    instances: list[InstanceSample]
    rss_mib: dict[str, float] = Field(description="RSS per process, by 'label [pid]'")


def instance_sample(row: dict[str, Any]) -> InstanceSample:
    """A row of ``/admin/instances``; used blocks = total - free (vLLM's null block excluded)."""
    free, total = row.get("free_blocks"), row.get("total_blocks")
    return InstanceSample(
        id=str(row["id"]),
        role=row.get("role"),
        healthy=bool(row.get("healthy")),
        used_blocks=total - free if free is not None and total is not None else None,
        total_blocks=total,
        num_running=int(row.get("num_running") or 0),
        num_waiting=int(row.get("num_waiting") or 0),
    )


# --- errors -------------------------------------------------------------------------------


def error_kind(error: str) -> str:
    """A short class for a record's error text: 'HTTP 503', 'TimeoutError', 'stream error'..."""
    text = error.strip()
    if text.startswith("HTTP "):
        return " ".join(text.split()[:2]).rstrip(":")
    if text.startswith("{"):
        with contextlib.suppress(ValueError, AttributeError):
            body = json.loads(text)
            code = body.get("code") or body.get("type")
            return f"stream error {code}" if code else "stream error"
        return "stream error"
    if text.startswith("cancelled"):
        return "cancelled"
    if text.startswith("stream ended without a token"):
        return "no token"
    head = text.split(":", 1)[0]
    if head and head.replace("_", "").replace(".", "").isalnum() and " " not in head:
        return head
    return text[:40] or "unknown"


@dataclass
class Counters:
    """What the load has done so far; updated by the request tasks, read by the sampler."""

    sent: int = 0
    completed: int = 0
    failed: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    ttft_s: list[float] = field(default_factory=list)
    output_tokens: int = 0

    @property
    def in_flight(self) -> int:
        return self.sent - self.completed - self.failed

    def add(self, record: RequestRecord) -> None:
        if record.success:
            self.completed += 1
            self.output_tokens += record.output_tokens
            if record.ttft_s is not None:
                self.ttft_s.append(record.ttft_s)
        else:
            self.failed += 1
            self.errors[error_kind(record.error)] += 1


# --- the processes of a cluster -----------------------------------------------------------


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    name: str
    cmdline: tuple[str, ...]
    rss: int


def _pdserve_role(cmdline: Sequence[str]) -> str | None:
    """'serve', 'gateway' or the instance's id, for a ``pdserve ...`` command line."""
    args = list(cmdline)
    # python -m pdserve.cli CMD, python .../bin/pdserve CMD, or .../bin/pdserve CMD
    for i, arg in enumerate(args[:3]):
        if arg.endswith(("pdserve.cli", "pdserve")) and i + 1 < len(args):
            command = args[i + 1]
            if command in ("serve", "gateway"):
                return command
            if command == "instance":
                for j, flag in enumerate(args):
                    if flag == "--instance-id" and j + 1 < len(args):
                        return args[j + 1]
                    if flag.startswith("--instance-id="):
                        return flag.split("=", 1)[1]
                return "instance"
    return None


def label_processes(procs: Iterable[ProcInfo]) -> dict[str, int]:
    """RSS by a label that stays the same for the life of a process: 'ROLE[/NAME] [pid]'.

    A pdserve process is named by its command (serve, gateway, the instance's id); any other
    process by the nearest pdserve ancestor and its own name (``decode-0/VLLM::EngineCor``).
    """
    by_pid = {p.pid: p for p in procs}
    labels: dict[str, int] = {}
    for p in by_pid.values():
        role = _pdserve_role(p.cmdline)
        if role is None:
            ancestor, seen = by_pid.get(p.ppid), {p.pid}
            while ancestor is not None and ancestor.pid not in seen:
                seen.add(ancestor.pid)
                owner = _pdserve_role(ancestor.cmdline)
                if owner is not None:
                    role = f"{owner}/{p.name}"
                    break
                ancestor = by_pid.get(ancestor.ppid)
            else:
                role = p.name
        labels[f"{role} [{p.pid}]"] = p.rss
    return labels


def _listener_pid(port: int) -> int | None:
    import psutil

    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return conn.pid
    return None


def root_pids(
    launcher_pid: int | None, gateway_url: str, rows: Sequence[dict[str, Any]]
) -> list[int]:
    """Where the cluster's process trees start: the launcher, else what runs on this host."""
    if launcher_pid is not None:
        return [launcher_pid]
    here = socket.gethostname()
    roots = [int(r["pid"]) for r in rows if r.get("pid") and r.get("host") == here]
    parts = urllib.parse.urlsplit(gateway_url)
    if parts.hostname in ("127.0.0.1", "localhost", "::1", here) and parts.port:
        gateway = _listener_pid(parts.port)
        if gateway is not None:
            roots.append(gateway)
    return roots


def process_tree(roots: Iterable[int]) -> list[ProcInfo]:
    """Every live process under ``roots`` (included), with its RSS."""
    import psutil

    found: dict[int, ProcInfo] = {}
    for root in roots:
        try:
            top = psutil.Process(root)
            family = [top, *top.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in family:
            with contextlib.suppress(psutil.Error), proc.oneshot():
                found[proc.pid] = ProcInfo(
                    proc.pid, proc.ppid(), proc.name(), tuple(proc.cmdline()),
                    proc.memory_info().rss,
                )  # fmt: skip
    return list(found.values())


# --- summaries (pure) ---------------------------------------------------------------------


class Drain(BaseModel):
    """KV blocks after the load: freed within the timeout, or leaked."""

    seconds: float = Field(description="until every instance held 0 blocks, or the timeout")
    drained: bool
    leaked_blocks: dict[str, int] = Field(description="used blocks left, per instance")


def drain_result(polls: Sequence[Sample], timeout_s: float) -> Drain:
    """From the samples taken after the load stopped (the last one decides)."""
    if not polls:
        return Drain(seconds=0.0, drained=False, leaked_blocks={})
    last = polls[-1]
    left = {i.id: i.used_blocks or 0 for i in last.instances if (i.used_blocks or 0) > 0}
    unknown = [i.id for i in last.instances if i.used_blocks is None]
    drained = not left and not unknown and bool(last.instances)
    return Drain(
        seconds=last.t_s - polls[0].t_s if drained else timeout_s,
        drained=drained,
        leaked_blocks=left | {i: -1 for i in unknown},
    )


class Growth(BaseModel):
    first_mib: float
    last_mib: float
    growth_mib: float
    first_t_s: float
    last_t_s: float
    mib_per_hour: float | None
    alive_at_end: bool


def memory_growth(samples: Sequence[Sample], warmup_s: float) -> dict[str, Growth]:
    """Per process: RSS at its first sample after ``warmup_s`` vs at its last sample.

    A process first seen after the warm-up (a restart) is measured from its first sample;
    when the run is shorter than the warm-up, the first samples serve as baseline.
    """
    if not samples:
        return {}
    after = [s for s in samples if s.t_s >= warmup_s] or list(samples)
    final_labels = set(samples[-1].rss_mib)
    first: dict[str, tuple[float, float]] = {}
    last: dict[str, tuple[float, float]] = {}
    for s in after:
        for label, mib in s.rss_mib.items():
            first.setdefault(label, (s.t_s, mib))
            last[label] = (s.t_s, mib)
    growth = {}
    for label, (t0, m0) in first.items():
        t1, m1 = last[label]
        hours = (t1 - t0) / 3600
        growth[label] = Growth(
            first_mib=m0,
            last_mib=m1,
            growth_mib=m1 - m0,
            first_t_s=t0,
            last_t_s=t1,
            mib_per_hour=(m1 - m0) / hours if hours > 0 else None,
            alive_at_end=label in final_labels,
        )
    return growth


class SoakSummary(BaseModel):
    capacity_rps: float
    target_rps: float
    achieved_rps: float = Field(description="requests sent per second of load")
    duration_s: float
    sent: int
    completed: int
    failed: int
    error_rate: float
    errors: dict[str, int]
    ttft_ms_p50: float | None
    ttft_ms_p99: float | None
    output_throughput: float
    peak_used_blocks: dict[str, int]
    drain: Drain
    memory: dict[str, Growth]
    max_growth_mib: float | None
    ok: bool
    problems: list[str]


def summarize_soak(
    settings: SoakSettings,
    capacity_rps: float,
    target_rps: float,
    duration_s: float,
    counters: Counters,
    samples: Sequence[Sample],
) -> SoakSummary:
    load = [s for s in samples if s.phase == "load"]
    drain = drain_result([s for s in samples if s.phase == "drain"], settings.drain_timeout_s)
    memory = memory_growth(samples, settings.warmup_s)
    peak: dict[str, int] = {}
    for s in load:
        for i in s.instances:
            peak[i.id] = max(peak.get(i.id, 0), i.used_blocks or 0)
    ttft = latency_stats(counters.ttft_s)
    error_rate = counters.failed / counters.sent if counters.sent else 0.0
    max_growth = max((g.growth_mib for g in memory.values()), default=None)
    problems = []
    if counters.completed == 0:
        problems.append("no request completed")
    if error_rate > settings.max_error_rate:
        problems.append(f"error rate {error_rate:.2%} > {settings.max_error_rate:.2%}")
    if not drain.drained:
        problems.append(
            f"KV blocks still used {settings.drain_timeout_s:g} s after the load: "
            f"{drain.leaked_blocks or 'no instance reported'}"
        )
    if max_growth is not None and max_growth > settings.max_rss_growth_mib:
        grown = [k for k, g in memory.items() if g.growth_mib > settings.max_rss_growth_mib]
        problems.append(f"RSS grew by more than {settings.max_rss_growth_mib:g} MiB: {grown}")
    return SoakSummary(
        capacity_rps=capacity_rps,
        target_rps=target_rps,
        achieved_rps=counters.sent / duration_s if duration_s > 0 else 0.0,
        duration_s=duration_s,
        sent=counters.sent,
        completed=counters.completed,
        failed=counters.failed,
        error_rate=error_rate,
        errors=dict(counters.errors),
        ttft_ms_p50=ttft.p50,
        ttft_ms_p99=ttft.p99,
        output_throughput=counters.output_tokens / duration_s if duration_s > 0 else 0.0,
        peak_used_blocks=peak,
        drain=drain,
        memory=memory,
        max_growth_mib=max_growth,
        ok=not problems,
        problems=problems,
    )


def arrival_times(rate: float, duration_s: float, seed: int) -> list[float]:
    """Poisson send times in [0, duration_s): as many as fall inside, none beyond."""
    expected = rate * duration_s
    n = int(expected + 6 * math.sqrt(expected) + 10)  # a Poisson count almost never exceeds
    times = poisson_times(n, rate, seed)
    while times[-1] < duration_s:  # should that happen anyway, draw more
        n *= 2
        times = poisson_times(n, rate, seed)
    return [t for t in times if t < duration_s]


# --- the run ------------------------------------------------------------------------------


class Sampler:
    """Takes samples: the counters, the instance table and every cluster process's RSS."""

    def __init__(
        self, url: str, api_key: str | None, launcher_pid: int | None, counters: Counters
    ) -> None:
        self.url = url
        self.api_key = api_key
        self.launcher_pid = launcher_pid
        self.counters = counters
        self.samples: list[Sample] = []
        self.start = time.perf_counter()

    def _take(self, phase: Phase) -> Sample:
        rows = instances(self.url, self.api_key)
        roots = root_pids(self.launcher_pid, self.url, rows)
        rss = label_processes(process_tree(roots))
        c = self.counters
        return Sample(
            t_s=time.perf_counter() - self.start,
            phase=phase,
            sent=c.sent,
            completed=c.completed,
            failed=c.failed,
            in_flight=c.in_flight,
            errors=dict(c.errors),
            instances=[instance_sample(r) for r in rows],
            rss_mib={k: round(v / MIB, 2) for k, v in rss.items()},
        )

    async def take(self, phase: Phase) -> Sample:
        sample = await asyncio.to_thread(self._take, phase)
        self.samples.append(sample)
        return sample


def _progress_line(s: Sample) -> str:
    used = " ".join(f"{i.id}={i.used_blocks}" for i in s.instances)
    rss = sum(s.rss_mib.values())
    return (
        f"[soak {s.t_s:7.0f} s {s.phase}] sent {s.sent} done {s.completed} failed {s.failed} "
        f"in flight {s.in_flight}; used blocks {used}; cluster RSS {rss:.0f} MiB"
    )


async def probe(settings: SoakSettings, target: Target) -> Summary:
    requests = settings.fixed_requests(settings.probe_requests, settings.seed + PROBE_SEED_OFFSET)
    outcome = await drive(
        target, requests, ClosedLoop(settings.probe_concurrency), 2 * settings.request_timeout_s,
        settings.progress, "capacity probe",
    )  # fmt: skip
    return summarize(outcome.records, outcome.duration_s)


async def soak(settings: SoakSettings, url: str, launcher_pid: int | None) -> dict[str, Any]:
    client = ClientSettings(
        url=url, api_key=settings.api_key, request_timeout_s=settings.request_timeout_s
    )
    target = await resolve_target(client)
    capacity = await probe(settings, target)
    if capacity.completed == 0:
        raise RuntimeError("the capacity probe completed no request")
    rate = settings.fraction * capacity.request_throughput
    duration = settings.minutes * 60
    times = arrival_times(rate, duration, settings.seed)
    requests = settings.fixed_requests(len(times), settings.seed + 1)
    print(
        f"capacity {capacity.request_throughput:.2f} req/s at concurrency "
        f"{settings.probe_concurrency}; soaking at {rate:.2f} req/s for {duration:.0f} s "
        f"({len(times)} requests)",
        file=sys.stderr,
    )
    counters = Counters()
    sampler = Sampler(url, settings.api_key, launcher_pid, counters)

    async def one(session: aiohttp.ClientSession, index: int) -> None:
        record = RequestRecord(
            index=index, input_len=requests[index].input_len, output_len=requests[index].output_len
        )
        await send(session, target, requests[index], record)
        counters.add(record)

    async def sample_every(interval: float) -> None:
        while True:
            sample = await sampler.take("load")
            if settings.progress:
                print(_progress_line(sample), file=sys.stderr)
            await asyncio.sleep(interval)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = sampler.start = time.perf_counter()
        sampling = asyncio.create_task(sample_every(settings.sample_interval_s))
        async with asyncio.TaskGroup() as group:
            for index, at in enumerate(times):
                delay = start + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                counters.sent += 1
                group.create_task(one(session, index))
        load_s = time.perf_counter() - start  # arrivals and every response
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
    await sampler.take("load")
    deadline = time.perf_counter() + settings.drain_timeout_s
    while True:
        sample = await sampler.take("drain")
        busy = [i for i in sample.instances if i.used_blocks != 0]
        if (not busy and sample.instances) or time.perf_counter() >= deadline:
            break
        await asyncio.sleep(DRAIN_POLL_S)
    summary = summarize_soak(
        settings, capacity.request_throughput, rate, duration, counters, sampler.samples
    )
    return {
        "settings": settings.model_dump(mode="json"),
        "url": url,
        "model": target.model,
        "probe": capacity.model_dump(mode="json"),
        "load_s": load_s,
        "summary": summary.model_dump(mode="json"),
        "samples": [s.model_dump(mode="json") for s in sampler.samples],
    }


@contextlib.contextmanager
def _cluster(settings: SoakSettings, serve_args: Sequence[str]) -> Iterator[LocalCluster | None]:
    if settings.url:
        yield None
        return
    args = [*serve_args, *(["--api-key", settings.api_key] if settings.api_key else [])]
    expected = expected_instances(serve_args)
    with local_cluster(
        args, expected, settings.log_dir, settings.start_timeout_s, settings.api_key
    ) as cluster:
        print(f"cluster ready: {cluster.url} (logs in {cluster.log_dir})", file=sys.stderr)
        yield cluster


def run(settings: SoakSettings, serve_args: Sequence[str] = ()) -> dict[str, Any]:
    with _cluster(settings, serve_args) as cluster:
        url = cluster.url if cluster else str(settings.url)
        if cluster is None and not healthy(instances(url, settings.api_key)):
            raise RuntimeError(f"{url}/admin/instances lists no healthy instance")
        result = asyncio.run(soak(settings, url, cluster.pid if cluster else None))
        result["serve_args"] = list(serve_args) if cluster else None
    write_json(settings.json_out, result)
    return result


def format_summary(result: dict[str, Any]) -> str:
    s = SoakSummary.model_validate(result["summary"])
    ttft = "-" if s.ttft_ms_p50 is None else f"{s.ttft_ms_p50:.0f}"
    ttft99 = "-" if s.ttft_ms_p99 is None else f"{s.ttft_ms_p99:.0f}"
    lines = [
        f"load: {s.achieved_rps:.2f} req/s for {s.duration_s:.0f} s ({s.target_rps:.2f} asked, "
        f"capacity {s.capacity_rps:.2f}); {s.output_throughput:.1f} output tok/s",
        f"requests: {s.sent} sent, {s.completed} completed, {s.failed} failed "
        f"({s.error_rate:.2%}) {s.errors or ''}",
        f"TTFT: P50 {ttft} ms, P99 {ttft99} ms",
        f"peak used KV blocks: {s.peak_used_blocks}",
        "KV after the load: "
        + (
            f"every block freed within {s.drain.seconds:.1f} s"
            if s.drain.drained
            else f"still used after {s.drain.seconds:.0f} s: {s.drain.leaked_blocks}"
        ),
        "RSS per process (first sample after warm-up -> last):",
    ]
    for label, g in sorted(s.memory.items(), key=lambda kv: -kv[1].growth_mib):
        rate = "" if g.mib_per_hour is None else f" ({g.mib_per_hour:+.0f} MiB/h)"
        gone = "" if g.alive_at_end else " (exited)"
        lines.append(
            f"  {label:40} {g.first_mib:8.0f} -> {g.last_mib:8.0f} MiB "
            f"{g.growth_mib:+7.1f}{rate}{gone}"
        )
    lines.append("PASS" if s.ok else "FAIL: " + "; ".join(s.problems))
    return "\n".join(lines)


def passed(result: dict[str, Any]) -> bool:
    return bool(result["summary"]["ok"])


def report(settings: SoakSettings, serve_args: Sequence[str] = ()) -> int:
    """Runs, prints the summary; exit status 1 if it failed or did not pass."""
    return report_cluster_bench("soak", settings, serve_args, run, format_summary, passed)


BENCH = Bench(SoakSettings, lambda settings, extra, argv: report(settings, extra))


def main(argv: Sequence[str] | None = None) -> int:
    return BENCH.main(
        "python -m benchmark.soak",
        "Steady Poisson load at a fraction of measured capacity; reports errors, KV blocks not "
        "freed, memory growth. Other arguments go to pdserve serve.",
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
