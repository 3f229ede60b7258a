"""The PNG figures of a comparison: the sweep across setups, and a latency CDF per load."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmark.plots import load_label, plot_cdfs, plot_sweep
from pdserve.workload.metrics import PointResult, Summary

SWEEP_FILE = "sweep.png"
ITL_FILE = "itl_tpot.png"


def draw_plots(
    results: Sequence[tuple[str, PointResult]], output_dir: Path, arrival: str, prefix: str = ""
) -> list[Path]:
    """Sweep figures across setups, and one CDF figure per load with a line per setup; a
    series per setup and repetition (each its own line: the spread is visible). ``prefix``
    names a mix's files."""
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
        plot_sweep(systems, output_dir / f"{prefix}{SWEEP_FILE}", label),
        plot_sweep(systems, output_dir / f"{prefix}{ITL_FILE}", label, panels=itl_panels),
    ]
    for load in sorted({point.load for _, point in results}):
        runs = {setup: point.records for setup, point in results if point.load == load}
        paths.append(plot_cdfs(runs, output_dir / f"{prefix}latency_cdf-{load:g}.png"))
    return paths
