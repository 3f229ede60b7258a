"""How long the gateway's dispatch decision takes, by cluster size (issue 12, item 8).

A ``ControlPlane`` with the default ``pd`` policy and N fake instances (half prefill, half
decode; ``--roles both``: all colocated) is fed ``Register`` and ``LoadReport`` messages
through ``handle``, as ``tests/unit/test_control_plane.py`` does, on a simulated clock:
every instance reports every 100 ms from a random phase (its load drifting at random
around a level of its own), and requests arrive as a Poisson stream of
``--rate-per-instance`` x N per second. Each request is one ``ControlPlane.dispatch``
(snapshot, policy, ``place``) with a request key, as the gateway's sessions call it; a
disaggregated request's held decode share becomes pending ``--prefill-s`` later
(``decode_started``), as its decode leg starts. Only ``dispatch`` is timed (wall clock,
``perf_counter_ns``, after as many untimed decisions); the reports arriving in between are
handled between two decisions, as in production, and their mean cost is printed beside.

    python -m benchmark.decision_time --json benchmark/results/decision-time.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import platform
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.gateway.control_plane import ControlPlane
from pdserve.gateway.settings import GatewaySettings
from pdserve.protocol.reports import LoadReport, Register, Role, RunningRequest
from pdserve.scheduler.dispatch import DispatchSettings, NoCapacity, make_policy
from pdserve.scheduler.snapshot import RequestEstimate

SIZES = (16, 64, 256, 1024)
REPORT_INTERVAL_S = 0.1
TOTAL_BLOCKS = 2000
BLOCK_SIZE = 16


def register(name: str, role: Role) -> Register:
    return Register(
        instance_id=name,
        role=role,
        url=f"http://{name}",
        host="bench",
        pid=1,
        model="m",
        kv_addresses=["tcp://bench:1"],
        control_address=None,
        max_model_len=8192,
        started_at=0.0,
    )


class FakeInstance:
    """An instance's load, drifting at random from report to report."""

    def __init__(self, name: str, rng: np.random.Generator) -> None:
        self.name = name
        self.rng = rng
        self.seq = 0
        self.running = int(rng.integers(0, 32))
        # Each instance's own level, which its load drifts around (however long the run).
        self.level = int(rng.integers(TOTAL_BLOCKS // 4, TOTAL_BLOCKS))
        self.free = self.level
        self.queued = 0

    def report(self) -> LoadReport:
        rng = self.rng
        self.seq += 1
        self.running = int(np.clip(self.running + rng.integers(-2, 3), 0, 64))
        drift = (self.level - self.free) // 20
        self.free = int(np.clip(self.free + drift + rng.integers(-40, 41), 0, TOTAL_BLOCKS))
        self.queued = int(np.clip(self.queued + rng.integers(-600, 601), 0, 8000))
        listed = [
            RunningRequest(f"{self.name}-r{i}", 600, 38, 40) for i in range(min(self.running, 32))
        ]
        return LoadReport(
            instance_id=self.name,
            seq=self.seq,
            num_running=self.running,
            num_waiting=int(self.queued > 0),
            num_loading=0,
            free_blocks=self.free,
            total_blocks=TOTAL_BLOCKS,
            block_size=BLOCK_SIZE,
            waiting_prompt_tokens=self.queued,
            waiting_blocks=self.queued // BLOCK_SIZE,
            step_ms=40.0,
            prefill_tokens_per_s=float(rng.uniform(3000, 6000)),
            num_preemptions=0,
            running=listed,
        )


def measure(
    instances: int,
    decisions: int,
    roles: str,
    rate_per_instance: float,
    prefill_s: float,
    seed: int,
) -> dict[str, Any]:
    """One cluster size: ``decisions`` timed dispatches (after as many untimed, to warm up)."""
    rng = np.random.default_rng(seed)
    now = [0.0]
    control = ControlPlane(
        GatewaySettings(), b"bench", make_policy(DispatchSettings()), clock=lambda: now[0]
    )
    fakes: list[FakeInstance] = []
    for i in range(instances):
        role: Role = "both" if roles == "both" else ("prefill" if i % 2 == 0 else "decode")
        name = f"{role}-{i:04d}"
        control.handle(register(name, role), now=0.0)
        fakes.append(FakeInstance(name, rng))
    # (time of the next report, instance): every instance from a random phase.
    reports = [(float(rng.uniform(0, REPORT_INTERVAL_S)), i) for i in range(instances)]
    heapq.heapify(reports)
    rate = rate_per_instance * instances
    gaps = rng.exponential(1.0 / rate, size=2 * decisions)
    prompts = rng.integers(16, 2048, size=2 * decisions)
    outputs = rng.integers(16, 512, size=2 * decisions)
    started: deque[tuple[float, str, str]] = deque()  # decode legs starting (time, key, where)
    arrival = REPORT_INTERVAL_S  # every instance has reported once
    times_ns: list[int] = []
    handled = 0
    handle_ns = 0
    held = 0
    clock = time.perf_counter_ns
    for n in range(2 * decisions):
        arrival += float(gaps[n])
        while reports[0][0] <= arrival:
            at, i = reports[0]
            now[0] = at
            message = fakes[i].report()
            began = clock()
            control.handle(message, now=at)
            handle_ns += clock() - began
            handled += 1
            heapq.heapreplace(reports, (at + REPORT_INTERVAL_S, i))
        while started and started[0][0] <= arrival:
            at, key, where = started.popleft()
            now[0] = at
            control.decode_started(key, where)
        now[0] = arrival
        key = f"req-{n}"
        estimate = RequestEstimate(int(prompts[n]), int(outputs[n]))
        began = clock()
        try:
            choice = control.dispatch(estimate, key)
        except NoCapacity:
            elapsed = clock() - began
            held += 1
        else:
            elapsed = clock() - began
            started.append((arrival + prefill_s, key, choice.decode))
        if n >= decisions:
            times_ns.append(elapsed)
    us = np.asarray(times_ns, dtype=float) / 1e3
    p50, p99 = np.percentile(us, [50, 99]).tolist()
    return {
        "instances": instances,
        "roles": roles,
        "decisions": decisions,
        "mean_us": float(us.mean()),
        "p50_us": p50,
        "p99_us": p99,
        "max_us": float(us.max()),
        "report_handle_us_mean": handle_ns / max(1, handled) / 1e3,
        "reports_per_decision": handled / (2 * decisions),
        "held": held,
        "simulated_s": arrival,
    }


def format_table(points: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'instances':>9} {'roles':>5} {'decisions':>9} {'mean us':>8} {'p50 us':>8}"
        f" {'p99 us':>8} {'report us':>9}"
    )
    lines = [head, "-" * len(head)]
    for p in points:
        lines.append(
            f"{p['instances']:>9} {p['roles']:>5} {p['decisions']:>9} {p['mean_us']:>8.1f}"
            f" {p['p50_us']:>8.1f} {p['p99_us']:>8.1f} {p['report_handle_us_mean']:>9.1f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.decision_time",
        description="Wall-clock time of ControlPlane.dispatch (snapshot, policy, place) "
        "by cluster size, reports arriving in between on a simulated clock.",
    )
    parser.add_argument("--instances", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--decisions", type=int, default=20_000, help="timed, per size")
    parser.add_argument("--roles", choices=("pd", "both"), default="pd")
    parser.add_argument("--rate-per-instance", type=float, default=0.5, help="requests/s")
    parser.add_argument("--prefill-s", type=float, default=0.3, help="until decode_started")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_out", default=None)
    given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(given)
    logging.getLogger("pdserve.gateway.control_plane").setLevel(logging.WARNING)
    points = [
        measure(n, args.decisions, args.roles, args.rate_per_instance, args.prefill_s, args.seed)
        for n in args.instances
    ]
    print(format_table(points))
    if args.json_out:
        result = {
            "command": " ".join(["python -m benchmark.decision_time", *given]),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "settings": vars(args),
            "points": points,
        }
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
