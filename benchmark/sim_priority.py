"""Priorities at 8 instances in the simulator (issue 13's priority run, at scale).

The setup of ``benchmark.sim_adaptive`` (8 ``both`` instances of ``qwen3-32b-h20``,
``azure-conv``, TTFT <= 6 s, TPOT <= 50 ms) under ``adaptive`` with its rescheduling, with
``--high-priority-fraction`` of the requests in the high class. The same requests run three
ways at every rate and seed:

- ``off``: the classes are not sent (first come first served; the policy sees none);
- ``priorities``: vLLM's priority scheduling on every instance, each request sent with its
  class (the policy gives the high class headroom: ``AdaptivePolicy``'s rule 4);
- ``priorities+shed``: the same with ``--shed-over-slo --shed-priority 0``: normal requests
  are refused while no instance is predicted to prefill them within the TTFT objective.

Printed per rate: each class's TTFT P99 and the ratios ``off`` / setup (above 1: the setup is
better). The goal (issue 13): high-priority P99 TTFT >= 1.5x better than with priorities off,
normal requests at most 1.1x worse. Writes ``report.md`` and ``results.json`` into
``--output``.

    python -m benchmark.sim_priority --output benchmark/results/sim-priority-8
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.sim_adaptive import ADAPTIVE_RESCHEDULING, sim_settings
from benchmark.sim_adaptive import SETUPS as ADAPTIVE_SETUPS
from pdserve.gateway.settings import GatewaySettings
from pdserve.scheduler.dispatch import DispatchSettings
from pdserve.scheduler.rescheduling import ReschedulingSettings
from pdserve.scheduler.slo import SloSettings
from pdserve.sim.run import SimPoint, simulate

# (priority scheduling and classes sent, shedding of the normal class)
SETUPS = {"off": (False, False), "priorities": (True, False), "priorities+shed": (True, True)}
BASELINE = "off"
GOAL_HIGH, GOAL_NORMAL = 1.5, 1.1


def run_setup(args: argparse.Namespace, seed: int, label: str) -> list[SimPoint]:
    sent, shed = SETUPS[label]
    setup = ADAPTIVE_SETUPS["adaptive+rescheduling"]
    settings = sim_settings(setup, label, args, seed).model_copy(
        update={
            "high_priority_fraction": args.high_priority_fraction,
            "priority_scheduling": sent,
        }
    )
    slo = SloSettings(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms)
    gateway = GatewaySettings(
        max_inflight=100_000, max_queued=100_000, shed_over_slo=shed, shed_priority=0
    )
    _, points = simulate(
        settings,
        DispatchSettings(policy="adaptive", slo=slo),
        ReschedulingSettings(rescheduling=True, **ADAPTIVE_RESCHEDULING),
        gateway,
    )
    print(f"seed {seed} {label}: done", file=sys.stderr, flush=True)
    return points


def run_all(args: argparse.Namespace) -> dict[int, dict[str, list[SimPoint]]]:
    jobs = [(seed, label) for seed in args.seeds for label in SETUPS]
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(run_setup, args, seed, label) for seed, label in jobs]
        done = [f.result() for f in futures]
    by_seed: dict[int, dict[str, list[SimPoint]]] = {seed: {} for seed in args.seeds}
    for (seed, label), points in zip(jobs, done, strict=True):
        by_seed[seed][label] = points
    return by_seed


def class_p99(point: SimPoint, high: bool) -> float | None:
    stats = point.summary.ttft_ms_high if high else point.summary.ttft_ms_normal
    return None if stats is None else stats.p99


def ratio(base: float | None, value: float | None) -> float | None:
    return base / value if base is not None and value else None


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def rows(by_seed: dict[int, dict[str, list[SimPoint]]]) -> list[dict[str, Any]]:
    out = []
    for seed, runs in by_seed.items():
        for i, base in enumerate(runs[BASELINE]):
            for label, points in runs.items():
                p = points[i]
                high, normal = class_p99(p, True), class_p99(p, False)
                out.append(
                    {
                        "seed": seed,
                        "setup": label,
                        "rate": p.rate,
                        "high_p99_ms": high,
                        "normal_p99_ms": normal,
                        "high_n": p.summary.ttft_ms_high.n if p.summary.ttft_ms_high else 0,
                        "high_ratio": ratio(class_p99(base, True), high),
                        "normal_ratio": ratio(class_p99(base, False), normal),
                        "slo_attainment": p.summary.slo_attainment,
                        "shed": p.shed,
                    }
                )
    return out


def render(table: list[dict[str, Any]], command: str, args: argparse.Namespace) -> str:
    lines = [
        "# Priorities at 8 instances (simulated)",
        "",
        f"Command: `{command}`",
        "",
        f"Profile `{args.profile}` (derived, not measured), workload `{args.workload}`, "
        f"{args.num_requests} requests per rate, {args.high_priority_fraction:.0%} high "
        f"priority, SLOs TTFT {args.slo_ttft_ms:g} ms / TPOT {args.slo_tpot_ms:g} ms, "
        "policy `adaptive` with rescheduling. TTFT P99 per class in ms; ratios: "
        f"`{BASELINE}` / setup (above 1: the setup is better). Goal: high >= {GOAL_HIGH}x, "
        f"normal >= {1 / GOAL_NORMAL:.2f}x (at most {GOAL_NORMAL}x worse).",
        "",
        "| seed | rate | setup | high P99 | normal P99 | high ratio | normal ratio "
        "| SLO met | shed | high n |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in table:
        lines.append(
            f"| {r['seed']} | {r['rate']:g} | {r['setup']} | {_num(r['high_p99_ms'])} "
            f"| {_num(r['normal_p99_ms'])} | {_num(r['high_ratio'], 2)} "
            f"| {_num(r['normal_ratio'], 2)} | {_num(r['slo_attainment'], 3)} | {r['shed']} "
            f"| {r['high_n']} |"
        )
    lines += ["", "Across seeds (median, min-max of the ratios):", ""]
    lines += ["| rate | setup | high ratio | normal ratio |", "| --- | --- | --- | --- |"]
    for rate in args.rate:
        for label in SETUPS:
            if label == BASELINE:
                continue
            picked = [r for r in table if r["rate"] == rate and r["setup"] == label]
            cells = []
            for key in ("high_ratio", "normal_ratio"):
                values = [r[key] for r in picked if r[key] is not None]
                cells.append(
                    f"{np.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"
                    if values
                    else "-"
                )
            lines.append(f"| {rate:g} | {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="qwen3-32b-h20")
    parser.add_argument("--workload", default="azure-conv")
    parser.add_argument("--rate", type=float, nargs="+", default=[5, 5.5, 6])
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--max-context", type=int, default=16384)
    parser.add_argument("--high-priority-fraction", type=float, default=0.15)
    parser.add_argument("--slo-ttft-ms", type=float, default=6000)
    parser.add_argument("--slo-tpot-ms", type=float, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=2, help="simulations run at once")
    args = parser.parse_args(argv)
    logging.getLogger("pdserve.gateway.control_plane").setLevel(logging.WARNING)
    by_seed = run_all(args)
    command = "python -m benchmark.sim_priority " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    table = rows(by_seed)
    report = render(table, command.strip(), args)
    print(report)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "report.md").write_text(report)
        payload = {
            "rows": table,
            "points": {
                str(seed): {label: [p.as_json() for p in points] for label, points in runs.items()}
                for seed, runs in by_seed.items()
            },
        }
        (args.output / "results.json").write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
