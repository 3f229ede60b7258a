"""Skewed decode load with rescheduling off and on: P99 TPOT, preemptions, finished requests.

A 1P2D cluster dispatches round-robin, and every other request is long (long prompt, long
output): all the long ones land on one decode instance, whose small KV cache then fills and
preempts, while the other idles with short requests. The same workload (same lengths, same
arrival times) runs twice, each on a fresh cluster: ``--no-rescheduling`` and
``--rescheduling``, where pdserve's policy migrates running requests off the overloaded
instance.

    python -m benchmark.rescheduling [--requests 24] [--rate 0.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.client import ClientSettings, drive, resolve_target
from benchmark.local_cluster import get_json, healthy, instances, local_cluster
from pdserve.workload.arrivals import OpenLoop, poisson_times
from pdserve.workload.metrics import summarize
from pdserve.workload.workloads import BenchRequest

CLUSTER_ARGS = [
    "--prefill", "1", "--decode", "2", "--policy", "round-robin",
    "--short-prompt-tokens", "0", "--prefill-saturation-s", "100000",
]  # fmt: skip


def skewed_requests(n: int, long: tuple[int, int], short: tuple[int, int]) -> list[BenchRequest]:
    """Even requests long, odd short: round-robin puts every long one on the same decoder."""
    rng = np.random.default_rng(0)
    requests = []
    for i in range(n):
        prompt_len, output_len = long if i % 2 == 0 else short
        prompt = [int(t) for t in rng.integers(1000, 40000, size=prompt_len)]
        requests.append(BenchRequest(prompt, prompt_len, output_len))
    return requests


def counter(url: str, name: str) -> float:
    """Sum over all label sets of a Prometheus counter on one /metrics page."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? ([0-9.eE+-]+)$", re.M)
    return sum(float(value) for _, value in pattern.findall(text))


def migrations(url: str, result: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = re.compile(
        rf'^pdserve_migrations_total\{{[^}}]*result="{result}"[^}}]*\}} ([0-9.eE+-]+)$', re.M
    )
    return sum(float(v) for v in pattern.findall(text))


def preemptions(url: str) -> float:
    return sum(counter(row["url"], "vllm:num_preemptions_total") for row in healthy(instances(url)))


def run_setting(
    rescheduling: bool, requests: Sequence[BenchRequest], times: Sequence[float], args: Any
) -> dict[str, Any]:
    flags = [
        *CLUSTER_ARGS,
        "--kv-cache-gib", "1", "--num-gpu-blocks-override", str(args.kv_blocks),
        "--max-model-len", "4096",
        "--rescheduling" if rescheduling else "--no-rescheduling",
    ]  # fmt: skip
    with local_cluster(flags, expected=3) as cluster:
        url = cluster.url
        target = asyncio.run(resolve_target(ClientSettings(url=url)))
        before = preemptions(url)
        outcome = asyncio.run(
            drive(target, requests, OpenLoop(tuple(times)), args.time_limit_s, progress=False)
        )
        summary = summarize(outcome.records, outcome.duration_s, None, None)
        tpot = summary.tpot_ms
        return {
            "rescheduling": rescheduling,
            "finished": summary.completed,
            "failed": summary.failed,
            "timed_out": outcome.timed_out,
            "duration_s": outcome.duration_s,
            "tpot_p50_ms": tpot.p50 if tpot else None,
            "tpot_p99_ms": tpot.p99 if tpot else None,
            "preemptions": preemptions(url) - before,
            "migrations_completed": migrations(url, "completed"),
            "migrations_aborted": migrations(url, "aborted"),
            "model": get_json(url + "/v1/models")["data"][0]["id"],
        }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if isinstance(value, float) else str(value)


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    columns = [
        "rescheduling", "finished", "failed", "tpot_p50_ms", "tpot_p99_ms", "preemptions",
        "migrations_completed", "migrations_aborted", "duration_s",
    ]  # fmt: skip
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(_cell(row[c]) for c in columns))
    if len(rows) == 2 and rows[0]["tpot_p99_ms"] and rows[1]["tpot_p99_ms"]:
        print(f"P99 TPOT on/off: {rows[1]['tpot_p99_ms'] / rows[0]['tpot_p99_ms']:.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--rate", type=float, default=0.5, help="requests per second (Poisson)")
    parser.add_argument("--long", type=int, nargs=2, default=[1000, 300], metavar=("IN", "OUT"))
    parser.add_argument("--short", type=int, nargs=2, default=[100, 60], metavar=("IN", "OUT"))
    parser.add_argument(
        "--kv-blocks",
        type=int,
        default=40,
        help="KV blocks per decode instance (of 128 tokens on CPU): few, so the long ones preempt",
    )
    parser.add_argument("--time-limit-s", type=float, default=900.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    requests = skewed_requests(args.requests, tuple(args.long), tuple(args.short))
    times = poisson_times(args.requests, args.rate, seed=0)
    rows = [run_setting(on, requests, times, args) for on in (False, True)]
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
