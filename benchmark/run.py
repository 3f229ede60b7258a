"""One benchmark run: a workload sent to one endpoint at one or several loads (a sweep).

For each load point (a request rate, or a concurrency for the closed loop) the same requests
are sent, the per-request records and their summary are written to
``<output_dir>/<label>-<arrival>-<load>.json``, and at the end the latency CDFs and the
sweep figure are drawn and a summary table is printed. Runs of several systems (``--label``)
can be compared afterwards with ``python -m benchmark.plots DIR1 DIR2 --output-dir DIR``.

    python -m benchmark.run --url http://127.0.0.1:8000 --workload chat \
        --tokenizer MODEL_DIR --rate 1 2 4 8 --num-requests 200 \
        --slo-ttft-ms 500 --slo-tpot-ms 100 --output-dir results/pdserve

The flags are generated from ``RunSettings`` (``pdserve.settings``), so the CLI, the
defaults and the JSON record of the settings cannot disagree.

Each point also reports the prefix-cache hit rate and the KV bytes moved between instances
over it (``benchmark.cache_counters``: the servers' counters before and after), where the
server at ``--url`` is a vLLM instance or a pdserve gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import Field, ValidationError

from benchmark.cache_counters import Sources, cache_stats, discover, scrape
from benchmark.client import ClientSettings, Target, drive, resolve_target
from benchmark.command import Bench, add_settings_arguments
from benchmark.plots import plot_results
from pdserve.settings import from_args
from pdserve.workload.arrivals import ArrivalKind, ClosedLoop
from pdserve.workload.metrics import CacheStats, PointResult, Summary, summarize
from pdserve.workload.workloads import (
    BenchRequest,
    WorkloadSettings,
    build_workload,
    schedule_for,
    split_warmup,
)

# Fields with several values; pdserve.settings handles scalar fields only.
LIST_FIELDS = ("rate", "concurrency")


class RunSettings(WorkloadSettings, ClientSettings):
    """Everything a run depends on; recorded in every result file."""

    arrival: ArrivalKind = Field(
        "poisson",
        description="poisson or gamma (open loop, --rate), closed (fixed --concurrency)",
    )
    rate: list[float] = Field(
        [1.0],
        description="requests per second (open loop); several values make a sweep; "
        "inf sends every request at once",
    )
    concurrency: list[int] = Field(
        [8], description="clients of the closed loop; several values make a sweep"
    )
    burstiness: float = Field(
        1.0, gt=0, description="gamma shape: 1 = Poisson, <1 burstier, >1 more regular"
    )
    time_limit_s: float = Field(
        600.0,
        gt=0,
        description="wall-clock limit of each load point; in-flight requests "
        "are then cancelled and count as failed",
    )
    slo_ttft_ms: float | None = Field(None, gt=0, description="TTFT SLO for goodput (ms)")
    slo_tpot_ms: float | None = Field(None, gt=0, description="TPOT SLO for goodput (ms)")
    output_dir: str = Field("bench-results", description="where JSON results and PNGs go")
    label: str = Field("pdserve", description="name of the system under test, in files/plots")
    progress: bool = Field(True, description="progress bar on stderr")
    plots: bool = Field(True, description="draw the PNG figures")


def load_points(settings: RunSettings) -> list[float]:
    """The sweep: rates for the open loop, concurrencies for the closed loop."""
    if settings.arrival == "closed":
        return [float(c) for c in settings.concurrency]
    return list(settings.rate)


def result_path(settings: RunSettings, load: float) -> Path:
    label = re.sub(r"[^A-Za-z0-9._-]", "_", settings.label)
    return Path(settings.output_dir) / f"{label}-{settings.arrival}-{load:g}.json"


async def run_point(
    settings: RunSettings,
    target: Target,
    requests: Sequence[BenchRequest],
    load: float,
    sources: Sources | None = None,
) -> PointResult:
    """Sends the requests at one load and summarizes what came back; ``sources``: whose
    counters give the point's prefix-cache hits and KV bytes (None: none are read). The
    workload's warm-up requests (a conversations workload's tenants) go first, all at once,
    and are not measured."""
    warm, requests = split_warmup(requests)
    if warm:
        await drive(target, warm, ClosedLoop(len(warm)), settings.time_limit_s, progress=False)
    schedule = schedule_for(requests, settings.arrival, load, settings.burstiness, settings.seed)
    what = "concurrency" if settings.arrival == "closed" else "rate"
    before = await asyncio.to_thread(scrape, sources) if sources else {}
    outcome = await drive(
        target, requests, schedule, settings.time_limit_s, settings.progress, f"{what} {load:g}"
    )
    after = await asyncio.to_thread(scrape, sources) if sources else {}
    summary = summarize(
        outcome.records, outcome.duration_s, settings.slo_ttft_ms, settings.slo_tpot_ms
    )
    return PointResult(
        label=settings.label,
        arrival=settings.arrival,
        load=load,
        model=target.model,
        timed_out=outcome.timed_out,
        settings=settings.model_dump(mode="json"),
        summary=summary,
        records=outcome.records,
        cache=cache_stats(before, after),
    )


def write_result(result: PointResult, path: Path) -> Path:
    """JSON (``Infinity`` for an infinite rate, which Python's json reads back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.model_dump(mode="json"), indent=1))
    return path


async def run_async(settings: RunSettings) -> dict[str, Any]:
    """``run`` for callers that already have an event loop."""
    target = await resolve_target(settings)
    sources = await asyncio.to_thread(discover, settings.url, settings.api_key)
    results: list[PointResult] = []
    files: list[str] = []
    for index, load in enumerate(load_points(settings)):
        # New prompts (seed + index) per load point: vLLM's prefix cache would serve prompts
        # sent again at the next load, flattering every later point.
        requests = build_workload(settings.model_copy(update={"seed": settings.seed + index}))
        results.append(await run_point(settings, target, requests, load, sources))
        files.append(str(write_result(results[-1], result_path(settings, load))))
    plots = plot_results(results, Path(settings.output_dir)) if settings.plots else []
    return {
        "settings": settings.model_dump(mode="json"),
        "model": target.model,
        "points": [
            {
                "load": r.load,
                "file": f,
                "timed_out": r.timed_out,
                "summary": r.summary.model_dump(mode="json"),
                "cache": r.cache.model_dump(mode="json") if r.cache else None,
            }
            for r, f in zip(results, files, strict=True)
        ],
        "plots": [str(p) for p in plots],
    }


def run(settings: RunSettings) -> dict[str, Any]:
    """Runs every load point; returns (JSON-ready) settings, model, summaries and file paths."""
    return asyncio.run(run_async(settings))


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """A fixed-width table, one line per load point."""
    load = "conc" if result["settings"]["arrival"] == "closed" else "rate"
    head = (
        f"{load:>6} {'done':>9} {'req/s':>7} {'tok/s':>8} {'TTFT':>8} {'P50':>8} {'P99':>8}"
        f" {'TPOT':>7} {'P99':>7} {'ITL P99':>8} {'E2E P50':>9} {'goodput':>8} {'SLO%':>6}"
    )
    lines = [head, "-" * len(head)]
    for point in result["points"]:
        s = Summary.model_validate(point["summary"])
        attainment = None if s.slo_attainment is None else 100 * s.slo_attainment
        lines.append(
            f"{point['load']:>6g} {f'{s.completed}/{s.requests_sent}':>9}"
            f" {s.request_throughput:>7.2f} {s.output_throughput:>8.1f}"
            f" {_cell(s.ttft_ms.mean):>8} {_cell(s.ttft_ms.p50):>8} {_cell(s.ttft_ms.p99):>8}"
            f" {_cell(s.tpot_ms.mean):>7} {_cell(s.tpot_ms.p99):>7} {_cell(s.itl_ms.p99):>8}"
            f" {_cell(s.e2e_ms.p50):>9} {_cell(s.goodput, 2):>8} {_cell(attainment):>6}"
            + ("  (time limit)" if point["timed_out"] else "")
        )
    lines += cache_lines(result["points"])
    return "\n".join([*lines, "latencies in ms; TTFT/TPOT without P are means"])


def cache_lines(points: Sequence[dict[str, Any]]) -> list[str]:
    """Per point, the prefix-cache hit rate and the KV bytes moved, where counted."""
    lines = []
    for point in points:
        if point.get("cache") is None:
            continue
        cache = CacheStats.model_validate(point["cache"])
        rate = "-" if cache.hit_rate is None else f"{100 * cache.hit_rate:.1f}%"
        moved = (
            "-" if cache.kv_transfer_bytes is None else f"{cache.kv_transfer_bytes / 1e6:.1f} MB"
        )
        lines.append(f"{point['load']:>6g}: prefix-cache hit rate {rate}, KV moved {moved}")
    return lines


def add_run_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[RunSettings] = RunSettings,
    exclude: Collection[str] = (),
    list_fields: Sequence[str] = LIST_FIELDS,
) -> None:
    """Flags of every field of ``model`` (``RunSettings`` or a subclass) but ``exclude``.

    Mounted as ``pdserve bench run``; ``pdserve bench compare`` mounts its subclass.
    ``list_fields`` (lists, or lists or None) take several values.
    """
    add_settings_arguments(parser, model, exclude, list_fields)


def settings_from_args(namespace: argparse.Namespace) -> RunSettings:
    return from_args(RunSettings, namespace)


def report(settings: RunSettings, paths: bool = False) -> int:
    """Runs and prints the table (and the files written); exit status 1 when the run failed
    or some load point completed no request."""
    try:
        result = run(settings)
    except (aiohttp.ClientError, OSError, RuntimeError, ValueError) as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    print(format_table(result))
    if paths:
        for path in [p["file"] for p in result["points"]] + result["plots"]:
            print(path)
    return 0 if all(p["summary"]["completed"] for p in result["points"]) else 1


def command(settings: RunSettings, extra: Sequence[str], argv: Sequence[str]) -> int:
    """``pdserve bench run``: the bundled model's tokenizer where it is the model served."""
    from pdserve import bundled_model

    bundled = settings.model in (None, bundled_model.MODEL_NAME)
    # Exact prompt lengths for the bundled model without asking for its path.
    if (
        settings.tokenizer is None
        and bundled
        and bundled_model.verify(bundled_model.model_dir()) is None
    ):
        settings = settings.model_copy(update={"tokenizer": str(bundled_model.model_dir())})
    return report(settings)


BENCH = Bench(RunSettings, command, list_fields=LIST_FIELDS)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmark.run``: no unknown arguments, the files written are listed."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.run",
        description="Load an OpenAI-compatible endpoint and measure TTFT, TPOT, ITL, goodput.",
    )
    add_run_arguments(parser)
    try:
        settings = settings_from_args(parser.parse_args(argv))
    except ValidationError as error:
        parser.error(str(error))
    return report(settings, paths=True)


if __name__ == "__main__":
    sys.exit(main())
