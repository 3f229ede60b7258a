"""PNG figures of benchmark results: latency CDFs, and latency and goodput against load.

The figures are the ones disaggregation papers argue with: a CDF shows the whole latency
distribution (tails included) of several runs on the same axes, and the sweep figure shows,
per system, how P50/P99 TTFT, P99 TPOT and goodput move as the request rate grows, which is
where prefill/decode interference appears. Figures are drawn on matplotlib ``Figure`` objects
(Agg canvas, no pyplot), so no display and no global state are involved.

    python -m benchmark.plots RESULT.json|DIR ... --output-dir DIR

compares saved runs: JSON files with the same ``label`` are one system's sweep.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.workload.metrics import MS, PointResult, RequestRecord, Summary

CDF_FILE = "latency_cdf.png"
SWEEP_FILE = "sweep.png"


def _figure(panels: int) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5 * panels, 3.8), layout="constrained")
    return figure, figure.subplots(1, panels, squeeze=False)[0]


def ecdf(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values and the fraction of samples at or below each."""
    x = np.sort(np.asarray(values, dtype=float))
    return x, np.arange(1, len(x) + 1) / max(len(x), 1)


def _cdf_samples(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    done = [r for r in records if r.success]
    return {
        "TTFT (ms)": [r.ttft_s * MS for r in done if r.ttft_s is not None],
        "TPOT (ms)": [t * MS for r in done if (t := r.tpot_s) is not None],
    }


def plot_cdfs(runs: Mapping[str, Sequence[RequestRecord]], path: Path) -> Path:
    """TTFT and TPOT CDFs, one line per run (key = legend entry)."""
    figure, axes = _figure(2)
    for name, records in runs.items():
        for ax, values in zip(axes, _cdf_samples(records).values(), strict=True):
            if values:
                ax.step(*ecdf(values), where="post", label=name)
    for ax, title in zip(axes, ("TTFT (ms)", "TPOT (ms)"), strict=True):
        ax.set(xlabel=title, ylabel="fraction of requests", ylim=(0, 1.01), title=f"{title} CDF")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def _panels(summaries: Sequence[Summary]) -> list[tuple[str, Any, float | None]]:
    """(title, value of a summary, SLO line) per panel; goodput needs an SLO, else throughput."""
    slo = summaries[0] if summaries else None
    last = (
        ("goodput (req/s)", lambda s: s.goodput, None)
        if slo is not None and slo.goodput is not None
        else ("throughput (req/s)", lambda s: s.request_throughput, None)
    )
    return [
        ("P50 TTFT (ms)", lambda s: s.ttft_ms.p50, slo.slo_ttft_ms if slo else None),
        ("P99 TTFT (ms)", lambda s: s.ttft_ms.p99, slo.slo_ttft_ms if slo else None),
        ("P99 TPOT (ms)", lambda s: s.tpot_ms.p99, slo.slo_tpot_ms if slo else None),
        last,
    ]


def plot_sweep(
    systems: Mapping[str, Sequence[tuple[float, Summary]]],
    path: Path,
    load_label: str = "request rate (req/s)",
    panels: Sequence[tuple[str, Any, float | None]] | None = None,
) -> Path:
    """Latency and goodput against load, one line per system (points sorted by load).

    ``panels``: (title, value of a summary, SLO line or None) per panel, instead of the
    default P50/P99 TTFT, P99 TPOT and goodput. A burst (rate inf) has no place on a rate
    axis; it shows in the CDFs and tables only.
    """
    every = [summary for points in systems.values() for _, summary in points]
    panels = list(panels) if panels is not None else _panels(every)
    figure, axes = _figure(len(panels))
    for name, points in systems.items():
        ordered = sorted((p for p in points if np.isfinite(p[0])), key=lambda p: p[0])
        loads = [load for load, _ in ordered]
        for ax, (_, value, _) in zip(axes, panels, strict=True):
            ys = [value(s) for _, s in ordered]
            ax.plot(loads, [np.nan if y is None else y for y in ys], marker="o", label=name)
    for ax, (title, _, slo) in zip(axes, panels, strict=True):
        if slo is not None:
            ax.axhline(slo, color="grey", linestyle="--", linewidth=1, label="SLO")
        ax.set(xlabel=load_label, title=title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def load_label(arrival: str) -> str:
    return "concurrency" if arrival == "closed" else "request rate (req/s)"


def read_results(paths: Iterable[Path]) -> list[PointResult]:
    """Result files, or every ``*.json`` result in the given directories."""
    files: list[Path] = []
    for path in paths:
        files += sorted(path.glob("*.json")) if path.is_dir() else [path]
    return [PointResult.model_validate(json.loads(file.read_text())) for file in files]


def plot_results(results: Sequence[PointResult], output_dir: Path) -> list[Path]:
    """The CDF figure of every point and the sweep figure of every system (label)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    runs = {f"{r.label} @ {r.load:g}": r.records for r in results}
    systems: dict[str, list[tuple[float, Summary]]] = defaultdict(list)
    for r in results:
        systems[r.label].append((r.load, r.summary))
    label = load_label(results[0].arrival) if results else load_label("poisson")
    return [
        plot_cdfs(runs, output_dir / CDF_FILE),
        plot_sweep(systems, output_dir / SWEEP_FILE, label),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.plots", description="Plot saved benchmark results together."
    )
    parser.add_argument("results", nargs="+", type=Path, help="result JSON files or dirs")
    parser.add_argument("--output-dir", type=Path, default=Path("."), help="where PNGs go")
    args = parser.parse_args(argv)
    for path in plot_results(read_results(args.results), args.output_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
