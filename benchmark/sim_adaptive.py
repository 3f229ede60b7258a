"""Adaptive PD against static splits in the simulator (issue 13's evaluation shape).

8 instances of the ``qwen3-32b-h20`` profile (derived, not measured: Qwen3-32B on H20s,
Llumnix v1's adaptive-PD setup) under the ``azure-conv`` workload, SLOs TTFT <= 6 s and
TPOT <= 50 ms; each setup runs the same requests at every rate:

- ``adaptive`` / ``adaptive+rescheduling``: 8 ``both`` instances, policy ``adaptive``
  (every instance may prefill or decode), without and with its rescheduling;
- ``6P2D``, ``5P3D``, ``4P4D``: static splits, policy ``pd``;
- ``8 colocated``: 8 ``both`` instances, policy ``pd``.

The goal: at the lowest rate where the best static setup meets the SLOs for <= 60% of the
requests, adaptive meets them for >= 95%. Writes ``report.md`` (the command, the table, the
goal against the figures), ``results.json`` and the sweep figure of ``pdserve bench``
(``sweep.png``) into ``--output``.

    python -m benchmark.sim_adaptive --output benchmark/results/sim-adaptive-8
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmark.plots import plot_sweep
from pdserve.gateway.settings import GatewaySettings
from pdserve.scheduler.dispatch import DispatchSettings, PolicyName
from pdserve.scheduler.rescheduling import ReschedulingSettings
from pdserve.scheduler.slo import SloSettings
from pdserve.sim.capacity import fluid_need
from pdserve.sim.profile import load_profile
from pdserve.sim.run import SimPoint, point_requests, simulate
from pdserve.sim.settings import SimSettings


@dataclass(frozen=True)
class Setup:
    prefill: int
    decode: int
    both: int
    policy: PolicyName
    rescheduling: bool = False

    @property
    def adaptive(self) -> bool:
        return self.policy == "adaptive"


SETUPS = {
    "adaptive": Setup(0, 0, 8, "adaptive"),
    "adaptive+rescheduling": Setup(0, 0, 8, "adaptive", rescheduling=True),
    "6P2D": Setup(6, 2, 0, "pd"),
    "5P3D": Setup(5, 3, 0, "pd"),
    "4P4D": Setup(4, 4, 0, "pd"),
    "8 colocated": Setup(0, 0, 8, "pd"),
}
# The adaptive rescheduler runs as Llumnix v1's (every 100 ms), with room for a few moves.
ADAPTIVE_RESCHEDULING = {"reschedule_interval_s": 0.1, "max_migrations": 4}
GOAL_STATIC, GOAL_ADAPTIVE = 0.60, 0.95
INSTANCES = 8  # every setup's


def sim_settings(setup: Setup, label: str, args: argparse.Namespace, seed: int) -> SimSettings:
    return SimSettings(
        prefill=setup.prefill,
        decode=setup.decode,
        both=setup.both,
        profile=args.profile,
        workload=args.workload,
        rate=args.rate,
        num_requests=args.num_requests,
        max_context=args.max_context,
        seed=seed,
        label=label,
    )


def run_setup(setup: Setup, label: str, args: argparse.Namespace, seed: int) -> list[SimPoint]:
    settings = sim_settings(setup, label, args, seed)
    slo = SloSettings(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms)
    extra = ADAPTIVE_RESCHEDULING if setup.adaptive else {}
    _, points = simulate(
        settings,
        DispatchSettings(policy=setup.policy, slo=slo),
        ReschedulingSettings(rescheduling=setup.rescheduling, **extra),
        GatewaySettings(max_inflight=100_000, max_queued=100_000),
    )
    return points


def _run_labelled(args: argparse.Namespace, seed: int, label: str) -> list[SimPoint]:
    points = run_setup(SETUPS[label], label, args, seed)
    print(f"seed {seed} {label}: done", file=sys.stderr, flush=True)
    return points


def run_all(args: argparse.Namespace) -> dict[int, dict[str, list[SimPoint]]]:
    """Every setup at every seed, ``--jobs`` of them at once (each is one process's
    deterministic simulation, so the results do not depend on the jobs; wall times do)."""
    jobs = [(seed, label) for seed in args.seeds for label in args.setups]
    if args.jobs <= 1:
        done = [_run_labelled(args, seed, label) for seed, label in jobs]
    else:
        with ProcessPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(_run_labelled, args, seed, label) for seed, label in jobs]
            done = [f.result() for f in futures]
    by_seed: dict[int, dict[str, list[SimPoint]]] = {seed: {} for seed in args.seeds}
    for (seed, label), points in zip(jobs, done, strict=True):
        by_seed[seed][label] = points
    return by_seed


def goal(runs: dict[str, list[SimPoint]]) -> dict[str, Any]:
    """The goal's rate (the lowest where the best static setup is at <= 60%) and figures."""
    static = [label for label in runs if not SETUPS[label].adaptive]
    adaptive = [label for label in runs if SETUPS[label].adaptive]
    if not static:
        return {"rate": None}
    rates = [p.rate for p in next(iter(runs.values()))]
    for i, rate in enumerate(rates):
        best = max((runs[label][i].summary.slo_attainment or 0.0, label) for label in static)
        if best[0] <= GOAL_STATIC:
            got = {label: runs[label][i].summary.slo_attainment for label in adaptive}
            met = all((v or 0.0) >= GOAL_ADAPTIVE for v in got.values()) if got else False
            return {"rate": rate, "best_static": best[1], "best_static_attainment": best[0],
                    "adaptive": got, "met": met}  # fmt: skip
    return {"rate": None}


def fluid_needs(args: argparse.Namespace, seed: int) -> list[float]:
    """Per rate, the busy instances its requests need at least (``pdserve.sim.capacity``):
    each point's own requests (the workload's seed plus the point's index, as simulated)."""
    profile = load_profile(args.profile)
    base = sim_settings(SETUPS["adaptive"], "adaptive", args, seed)
    out = []
    for index, rate in enumerate(args.rate):
        _, requests = point_requests(base, index)
        lengths = [(r.input_len, r.output_len) for r in requests]
        out.append(fluid_need(profile, lengths, rate, args.slo_tpot_ms / 1000).total)
    return out


def need_line(needs: Sequence[float]) -> str:
    cells = ", ".join(f"{n:.2f}" for n in needs)
    return (
        f"Fluid bound (`pdserve.sim.capacity`): busy instances each rate needs at least under "
        f"the TPOT objective, of {INSTANCES}: {cells}."
    )


def across_seeds(by_seed: dict[int, dict[str, list[SimPoint]]]) -> list[str]:
    """SLO attainment per setup and rate: the mean over the seeds and the range."""
    first = next(iter(by_seed.values()))
    rates = [p.rate for p in next(iter(first.values()))]
    lines = ["| setup | " + " | ".join(f"{r:g}" for r in rates) + " |"]
    lines.append("| --- |" + " --- |" * len(rates))
    for label in first:
        cells = []
        for i in range(len(rates)):
            got = [runs[label][i].summary.slo_attainment or 0.0 for runs in by_seed.values()]
            cells.append(f"{sum(got) / len(got):.3f} ({min(got):.2f}-{max(got):.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(runs: dict[str, list[SimPoint]]) -> list[str]:
    lines = [
        "| setup | rate | SLO attainment | done | TTFT mean | TTFT P99 | TPOT mean | TPOT P99 |"
        " preempt | migrations |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, points in runs.items():
        for p in points:
            s = p.summary
            lines.append(
                f"| {label} | {p.rate:g} | {_num(s.slo_attainment, 3)} | "
                f"{s.completed}/{s.requests_sent} | {_num(s.ttft_ms.mean)} | "
                f"{_num(s.ttft_ms.p99)} | {_num(s.tpot_ms.mean, 1)} | {_num(s.tpot_ms.p99, 1)} | "
                f"{p.preemptions} | {p.migrations} |"
            )
    return lines


def attainment_grid(runs: dict[str, list[SimPoint]]) -> list[str]:
    rates = [p.rate for p in next(iter(runs.values()))]
    lines = ["| setup | " + " | ".join(f"{r:g}" for r in rates) + " |"]
    lines.append("| --- |" + " --- |" * len(rates))
    for label, points in runs.items():
        cells = " | ".join(_num(p.summary.slo_attainment, 3) for p in points)
        lines.append(f"| {label} | {cells} |")
    return lines


def render(
    by_seed: dict[int, dict[str, list[SimPoint]]],
    command: str,
    args: Any,
    needs: dict[int, list[float]],
) -> str:
    lines = [
        f"# Adaptive PD at 8 instances (simulated, {args.profile}, {args.workload})",
        "",
        f"Command: `{command}`",
        "",
        f"SLOs TTFT <= {args.slo_ttft_ms:g} ms, TPOT <= {args.slo_tpot_ms:g} ms; "
        f"{args.num_requests} requests per rate, max context {args.max_context}; profile "
        "derived, not measured. Latencies in ms.",
        "",
        f"## All seeds ({', '.join(str(s) for s in by_seed)})",
        "",
        "SLO attainment by rate (req/s): the mean over the seeds (min-max).",
        "",
        *across_seeds(by_seed),
        "",
    ]
    for seed, runs in by_seed.items():
        g = goal(runs)
        lines += [f"## Seed {seed}", "", "SLO attainment by rate (req/s):", ""]
        lines += attainment_grid(runs)
        lines += ["", need_line(needs[seed]), "", _goal_line(g), ""]
        lines += table(runs)
        lines.append("")
    return "\n".join(lines) + "\n"


def _goal_line(g: dict[str, Any]) -> str:
    if g.get("rate") is None:
        return "Goal: no rate of the sweep brings the best static setup to <= 60%."
    adaptive = ", ".join(f"{k} {_num(v, 3)}" for k, v in g["adaptive"].items())
    verdict = "met" if g["met"] else "NOT met"
    return (
        f"Goal ({verdict}): at {g['rate']:g} req/s the best static setup, {g['best_static']}, "
        f"meets the SLOs for {g['best_static_attainment']:.3f}; {adaptive} (goal >= 0.95)."
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="qwen3-32b-h20")
    parser.add_argument("--workload", default="azure-conv")
    parser.add_argument("--rate", type=float, nargs="+", default=[5, 5.5, 6, 6.5, 7])
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--max-context", type=int, default=16384)
    parser.add_argument("--slo-ttft-ms", type=float, default=6000)
    parser.add_argument("--slo-tpot-ms", type=float, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=1, help="simulations run at once")
    args = parser.parse_args(argv)
    logging.getLogger("pdserve.gateway.control_plane").setLevel(logging.WARNING)
    by_seed = run_all(args)
    command = "python -m benchmark.sim_adaptive " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    needs = {seed: fluid_needs(args, seed) for seed in args.seeds}
    report = render(by_seed, command.strip(), args, needs)
    print(report)
    if args.output is None:
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "report.md").write_text(report)
    for seed, runs in by_seed.items():
        summaries = {label: [(p.rate, p.summary) for p in points] for label, points in runs.items()}
        plot_sweep(summaries, args.output / f"sweep-seed{seed}.png", "rate (req/s)")
    payload = {
        str(seed): {label: [p.as_json() for p in points] for label, points in runs.items()}
        for seed, runs in by_seed.items()
    }
    payload["goal"] = {str(seed): goal(runs) for seed, runs in by_seed.items()}
    payload["fluid_need"] = {str(seed): needs[seed] for seed in args.seeds}
    (args.output / "results.json").write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
