"""The Llumnix paper's experiment shape in the simulator: policies over a rate sweep.

16 colocated instances (``--both 16``) of the ``llama-2-7b-a10`` profile (derived, not
measured: LLaMA-2-7B on A10s, the paper's setup) under the ``sharegpt`` workload; each
policy runs the same requests at every rate:

- ``round-robin``: blind turns;
- ``least-requests``: load balancing by queue size (the paper's INFaaS-like baseline);
- ``pd``: pdserve's dispatch (most KV freeness per request, Llumnix's load metric);
- ``pd+rescheduling``: the same with live migration between instances.

Writes ``report.md`` (the command, the figures, the ratios against least-requests) and the
sweep figure of ``pdserve bench`` (``sweep.png``) into ``--output``.

    python -m benchmark.sim_policies --output benchmark/results/sim-llumnix-16
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmark.plots import plot_sweep
from pdserve.gateway.settings import GatewaySettings
from pdserve.scheduler.dispatch import DispatchSettings, PolicyName
from pdserve.scheduler.rescheduling import ReschedulingSettings
from pdserve.sim.run import SimPoint, simulate
from pdserve.sim.settings import SimSettings

SETUPS: dict[str, tuple[PolicyName, bool]] = {
    "round-robin": ("round-robin", False),
    "least-requests": ("least-requests", False),
    "pd": ("pd", False),
    "pd+rescheduling": ("pd", True),
}
BASELINE = "least-requests"
FIGURES = (
    ("TTFT mean", lambda p: p.summary.ttft_ms.mean),
    ("TTFT P99", lambda p: p.summary.ttft_ms.p99),
    ("TPOT P99", lambda p: p.summary.tpot_ms.p99),
    ("ITL P99", lambda p: p.summary.itl_ms.p99),
)


def run_setups(args: argparse.Namespace) -> dict[str, list[SimPoint]]:
    out = {}
    for label, (policy, rescheduling) in SETUPS.items():
        settings = SimSettings(
            prefill=0,
            decode=0,
            both=args.instances,
            profile=args.profile,
            workload=args.workload,
            rate=args.rate,
            num_requests=args.num_requests,
            max_context=args.max_context,
            seed=args.seed,
            label=label,
        )
        _, points = simulate(
            settings,
            DispatchSettings(policy=policy),
            ReschedulingSettings(rescheduling=rescheduling),
            GatewaySettings(max_inflight=100_000, max_queued=100_000),
        )
        out[label] = points
        print(f"{label}: done", file=sys.stderr, flush=True)
    return out


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(runs: dict[str, list[SimPoint]], command: str, args: argparse.Namespace) -> str:
    lines = [
        f"# Policies at {args.instances} instances (simulated)",
        "",
        f"Command: `{command}`",
        "",
        f"Profile `{args.profile}` (derived, not measured), workload `{args.workload}`, "
        f"{args.num_requests} requests per rate, max context {args.max_context}. Latencies in "
        "ms; speed = simulated seconds per wall second.",
        "",
        "| policy | rate | done | TTFT mean | TTFT P99 | TPOT P99 | ITL P99 | preempt | "
        "migrations | speed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, points in runs.items():
        for p in points:
            s = p.summary
            speed = p.simulated_s / p.wall_s if p.wall_s else None
            lines.append(
                f"| {label} | {p.rate:g} | {s.completed}/{s.requests_sent} | "
                f"{_num(s.ttft_ms.mean)} | {_num(s.ttft_ms.p99)} | {_num(s.tpot_ms.p99)} | "
                f"{_num(s.itl_ms.p99)} | {p.preemptions} | {p.migrations} | {_num(speed)}x |"
            )
    lines += ["", f"Ratios: {BASELINE} / policy (above 1: the policy is better), per rate.", ""]
    lines.append("| policy | rate | " + " | ".join(name for name, _ in FIGURES) + " |")
    lines.append("| --- | --- |" + " --- |" * len(FIGURES))
    base = runs[BASELINE]
    for label, points in runs.items():
        if label == BASELINE:
            continue
        for b, p in zip(base, points, strict=True):
            cells = []
            for _, value in FIGURES:
                num, den = value(b), value(p)
                cells.append("-" if not num or not den else f"{num / den:.2f}x")
            lines.append(f"| {label} | {p.rate:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--profile", default="llama-2-7b-a10")
    parser.add_argument("--workload", default="sharegpt")
    parser.add_argument("--rate", type=float, nargs="+", default=[8, 12, 16, 20, 24])
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("benchmark/results/sim-llumnix-16"))
    args = parser.parse_args(argv)
    runs = run_setups(args)
    args.output.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmark.sim_policies " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    report = render(runs, command.strip(), args)
    (args.output / "report.md").write_text(report)
    summaries = {label: [(p.rate, p.summary) for p in points] for label, points in runs.items()}
    plot_sweep(summaries, args.output / "sweep.png", "rate (req/s)")
    payload: dict[str, Any] = {
        label: [p.as_json() for p in points] for label, points in runs.items()
    }
    (args.output / "results.json").write_text(json.dumps(payload, indent=1))
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
