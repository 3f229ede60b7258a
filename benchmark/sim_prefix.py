"""Shared prefixes in the simulator (issue 14's evaluation shape): routing by cached prefix
against load-only policies, at 16 instances.

16 instances of the ``qwen3-32b-h20`` profile (derived, not measured: Qwen3-32B on H20s,
93.9k tokens of KV each) under the ``conversations`` workload shaped like llm-d's precise
prefix-cache benchmark: 150 tenants with 6,000-token system prompts (900k tokens together,
~10x one instance's KV cache), conversations of 4 turns of 200-token user messages and
200-token answers, 5 s mean think time. Each setup runs the same requests at every rate:

- ``round-robin``: 16 ``both`` instances, blind turns;
- ``pd``: 16 ``both`` instances under pdserve's default policy (KV freeness, queues);
- ``8P8D``: 8 prefill and 8 decode instances, ``pd``;
- ``router-cache-aware`` (and ``... 8P8D``): vllm-router's ``cache_aware`` re-created in
  ``pdserve.scheduler.router_cache_aware`` (an approximate tree of the prompts routed to each
  instance, the longest match above 0.3 of the prompt, else the smallest tree, the shortest
  queue on imbalance; its defaults), the baseline the real comparison runs as the Rust
  router itself (benchmark/results/compare-prefix-2core);
- ``cache-aware`` (and ``cache-aware 8P8D``): the prefix-cache-aware policy, fed by each
  engine's block pool as real instances feed it with vLLM's KV events, with its defaults,
  and with ``--cache-decode-balance 0.5`` (``b=0.5``: a holder of the prefix is left once its
  free KV blocks per request fall under half the best instance's; the default was 0.5 until
  this benchmark showed it spreads long prefixes over every instance).

The goals: mean and P99 TTFT of ``cache-aware`` at least 2x better than ``round-robin``'s
and 1.3x better than ``router-cache-aware``'s, at every rate of the sweep, in both seeds.
Writes ``report.md`` (the command, the tables, the ratios and their spread over the seeds,
the goals against the figures), ``results.json`` and one sweep figure per seed into
``--output``.

    python -m benchmark.sim_prefix --output benchmark/results/sim-prefix-16
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from benchmark.plots import plot_sweep
from pdserve.gateway.settings import GatewaySettings
from pdserve.scheduler.dispatch import DispatchSettings, PolicyName
from pdserve.scheduler.rescheduling import ReschedulingSettings
from pdserve.sim.run import SimPoint, simulate
from pdserve.sim.settings import SimSettings

CACHE_AWARE = "cache-aware"
BASELINE = "round-robin"
ROUTER = "router-cache-aware"  # vllm-router's cache_aware, re-created
# cache-aware's TTFT (mean and P99) at least this many times better than each baseline's.
GOALS = {BASELINE: 2.0, ROUTER: 1.3}


@dataclass(frozen=True)
class Setup:
    prefill: int
    decode: int
    both: int
    policy: str
    decode_balance: float | None = None  # cache-aware's --cache-decode-balance (None: default)

    def dispatch(self) -> DispatchSettings:
        values: dict[str, Any] = {"policy": self.policy}
        if self.decode_balance is not None:
            values["cache"] = {"decode_balance": self.decode_balance}
        return DispatchSettings.model_validate(values)


def setups(instances: int) -> dict[str, Setup]:
    """The setups, the prefix-aware ones only where their policies exist."""
    half = instances // 2
    split = f"{half}P{instances - half}D"
    out = {
        BASELINE: Setup(0, 0, instances, "round-robin"),
        "pd": Setup(0, 0, instances, "pd"),
        split: Setup(half, instances - half, 0, "pd"),
    }
    policies = get_args(PolicyName)
    if ROUTER in policies:
        out[ROUTER] = Setup(0, 0, instances, ROUTER)
        out[f"{ROUTER} {split}"] = Setup(half, instances - half, 0, ROUTER)
    if CACHE_AWARE in policies:
        out[CACHE_AWARE] = Setup(0, 0, instances, CACHE_AWARE)
        out[f"{CACHE_AWARE} b=0.5"] = Setup(0, 0, instances, CACHE_AWARE, 0.5)
        out[f"{CACHE_AWARE} {split}"] = Setup(half, instances - half, 0, CACHE_AWARE)
    return out


def run_setup(setup: Setup, label: str, args: argparse.Namespace, seed: int) -> list[SimPoint]:
    settings = SimSettings(
        prefill=setup.prefill,
        decode=setup.decode,
        both=setup.both,
        profile=args.profile,
        workload="conversations",
        prefix_groups=args.tenants,
        prefix_len=args.system_len,
        turns=args.turns,
        input_len=args.user_len,
        output_len=args.answer_len,
        think_time_s=args.think_time_s,
        rate=args.rate,
        num_requests=args.num_requests,
        max_context=args.max_context,
        seed=seed,
        label=label,
    )
    _, points = simulate(
        settings,
        setup.dispatch(),
        ReschedulingSettings(),
        GatewaySettings(max_inflight=1_000_000, max_queued=1_000_000),
    )
    return points


Runs = dict[int, dict[str, list[SimPoint]]]  # seed -> setup -> points by rate


def run_all(args: argparse.Namespace) -> Runs:
    runs: Runs = {}
    for seed in args.seeds:
        runs[seed] = {}
        for label, setup in setups(args.instances).items():
            runs[seed][label] = run_setup(setup, label, args, seed)
            print(f"seed {seed}: {label} done", file=sys.stderr, flush=True)
    return runs


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _table(runs: Runs) -> list[str]:
    lines = [
        "| seed | setup | rate | done | TTFT mean | TTFT P99 | TPOT P99 | hit rate | "
        "KV moved (GB) | preempt | speed |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for seed, by_setup in runs.items():
        for label, points in by_setup.items():
            for p in points:
                s = p.summary
                speed = p.simulated_s / p.wall_s if p.wall_s else None
                lines.append(
                    f"| {seed} | {label} | {p.rate:g} | {s.completed}/{s.requests_sent} "
                    f"| {_num(s.ttft_ms.mean)} | {_num(s.ttft_ms.p99)} | {_num(s.tpot_ms.p99)} "
                    f"| {_pct(p.cache.hit_rate)} | {_num(p.kv_transfer_bytes / 1e9, 1)} "
                    f"| {p.preemptions} | {_num(speed)}x |"
                )
    return lines


METRICS: tuple[tuple[str, Callable[[SimPoint], float | None]], ...] = (
    ("TTFT mean", lambda p: p.summary.ttft_ms.mean),
    ("TTFT P99", lambda p: p.summary.ttft_ms.p99),
)


def ratios(runs: Runs, candidate: str, baseline: str) -> dict[tuple[str, float], list[float]]:
    """baseline / candidate per (metric, rate), one per seed (above 1: the candidate is
    better)."""
    out: dict[tuple[str, float], list[float]] = {}
    for by_setup in runs.values():
        if candidate not in by_setup or baseline not in by_setup:
            continue
        for mine, theirs in zip(by_setup[candidate], by_setup[baseline], strict=True):
            for name, value in METRICS:
                a, b = value(mine), value(theirs)
                if a and b:
                    out.setdefault((name, mine.rate), []).append(b / a)
    return out


def candidates(runs: Runs) -> tuple[list[str], list[str]]:
    """(the cache-aware setups, the others); without cache-aware, ``pd`` against the rest."""
    labels = list(next(iter(runs.values())))
    mine = [label for label in labels if label.startswith(CACHE_AWARE)] or ["pd"]
    return mine, [label for label in labels if label not in mine]


def _ratio_lines(runs: Runs) -> list[str]:
    mine, baselines = candidates(runs)
    lines = [
        "Ratios: baseline / setup (above 1: the setup is better), median and min-max over "
        "the seeds.",
        "",
        "| setup | baseline | metric | rate | median | min-max | per seed |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for candidate in mine:
        for baseline in baselines:
            for (name, rate), values in ratios(runs, candidate, baseline).items():
                lines.append(
                    f"| {candidate} | {baseline} | {name} | {rate:g} "
                    f"| {statistics.median(values):.2f}x "
                    f"| {min(values):.2f}-{max(values):.2f}x "
                    f"| {', '.join(f'{v:.2f}' for v in values)} |"
                )
    return lines


def goal_lines(runs: Runs) -> list[str]:
    """The goals for every cache-aware setup: its smallest ratio to each baseline."""
    mine, _ = candidates(runs)
    if mine == ["pd"]:
        return [f"Goal: not evaluated ({CACHE_AWARE} is not a policy of pdserve.scheduler yet)."]
    lines = ["Goals: mean and P99 TTFT at every rate and seed, against each baseline:", ""]
    for candidate in mine:
        for baseline, goal in GOALS.items():
            found = ratios(runs, candidate, baseline)
            worst = min((v for values in found.values() for v in values), default=None)
            verdict = "unmeasured" if worst is None else ("met" if worst >= goal else "NOT met")
            smallest = "" if worst is None else f" (the smallest ratio: {worst:.2f}x)"
            lines.append(f"- {candidate} vs {baseline}, at least {goal:g}x: {verdict}{smallest}")
    return lines


def render(runs: Runs, command: str, args: argparse.Namespace) -> str:
    lines = [
        f"# Shared prefixes at {args.instances} instances (simulated)",
        "",
        f"Command: `{command}`",
        "",
        f"Profile `{args.profile}` (derived, not measured); workload `conversations`: "
        f"{args.tenants} tenants with {args.system_len}-token system prompts, {args.turns} "
        f"turns of {args.user_len}-token user messages and {args.answer_len}-token answers, "
        f"{args.think_time_s:g} s mean think time; {args.num_requests} requests per rate, "
        f"seeds {', '.join(map(str, args.seeds))}. Latencies in ms; hit rate: vLLM's "
        "prefix-cache hit rate (tokens found cached / tokens looked up, every instance); KV "
        "moved: bytes pulled between instances; speed: simulated seconds per wall second.",
        "",
        *_table(runs),
        "",
        *_ratio_lines(runs),
        "",
        *goal_lines(runs),
    ]
    return "\n".join(lines) + "\n"


def write(runs: Runs, args: argparse.Namespace, command: str) -> str:
    args.output.mkdir(parents=True, exist_ok=True)
    report = render(runs, command, args)
    (args.output / "report.md").write_text(report)
    for seed, by_setup in runs.items():
        summaries = {label: [(p.rate, p.summary) for p in pts] for label, pts in by_setup.items()}
        plot_sweep(summaries, args.output / f"sweep-seed{seed}.png", "rate (req/s)")
    payload: dict[str, Any] = {
        str(seed): {label: [p.as_json() for p in pts] for label, pts in by_setup.items()}
        for seed, by_setup in runs.items()
    }
    (args.output / "results.json").write_text(json.dumps(payload, indent=1))
    return report


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--profile", default="qwen3-32b-h20")
    parser.add_argument("--tenants", type=int, default=150)
    parser.add_argument("--system-len", type=int, default=6000)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--user-len", type=int, default=200)
    parser.add_argument("--answer-len", type=int, default=200)
    parser.add_argument("--think-time-s", type=float, default=5.0)
    parser.add_argument("--rate", type=float, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--max-context", type=int, default=8192)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--output", type=Path, default=Path("benchmark/results/sim-prefix-16"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    logging.getLogger("pdserve.gateway.control_plane").setLevel(logging.WARNING)
    runs = run_all(args)
    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m benchmark.sim_prefix", *map(shlex.quote, given)])
    print(write(runs, args, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
