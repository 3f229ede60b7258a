"""The simulator against real runs: the same requests on real clusters and in ``pdserve sim``.

For each setup (``pdserve serve`` arguments) a real cluster is started, every workload is
sent at every rate (``pdserve bench run``'s own ``run_point``: same requests, arrival times
and metrics code), and the very same points are simulated with the profile measured on this
machine (``pdserve profile``) and the setup's own dispatch and rescheduling settings. The
relative error ``(simulated - real) / real`` of TTFT and TPOT (mean and P99) is reported per
point, with its median over all points.

    python -m benchmark.sim_validation --output benchmark/results/sim-validation
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmark.client import resolve_target
from benchmark.local_cluster import expected_instances, local_cluster, serve_settings
from benchmark.run import RunSettings, run_point
from pdserve.cluster.launcher import ServeSettings
from pdserve.gateway.settings import GatewaySettings
from pdserve.scheduler.dispatch import DispatchSettings
from pdserve.scheduler.rescheduling import ReschedulingSettings
from pdserve.sim.profile import load_profile
from pdserve.sim.run import simulate_point
from pdserve.sim.settings import SimSettings
from pdserve.workload.metrics import Summary
from pdserve.workload.workloads import build_workload

SETUPS = {
    "1p1d": "--prefill 1 --decode 1",
    "2-colocated": "--prefill 0 --decode 0 --both 2",
    "1p2d": "--prefill 1 --decode 2",
}
WORKLOADS = {
    "prefill-heavy": {"workload": "fixed", "input_len": 384, "output_len": 24},
    "decode-heavy": {"workload": "fixed", "input_len": 64, "output_len": 96},
}
METRICS = (("ttft_ms", "mean"), ("ttft_ms", "p99"), ("tpot_ms", "mean"), ("tpot_ms", "p99"))


@dataclass
class Row:
    setup: str
    workload: str
    rate: float
    real: dict[str, float | None]
    simulated: dict[str, float | None]

    def error(self, key: str) -> float | None:
        real, simulated = self.real.get(key), self.simulated.get(key)
        if real is None or simulated is None or real == 0:
            return None
        return (simulated - real) / real


def figures(summary: Summary) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for metric, stat in METRICS:
        out[f"{metric}.{stat}"] = getattr(getattr(summary, metric), stat)
    out["completed"] = summary.completed
    return out


def sim_settings(run: RunSettings, serve: ServeSettings, profile: str) -> SimSettings:
    own = {"rate", "arrival", "burstiness", "label"}
    workload = {
        k: v for k, v in run.model_dump().items() if k in SimSettings.model_fields and k not in own
    }
    return SimSettings(
        **workload,
        prefill=serve.prefill,
        decode=serve.decode,
        both=serve.both,
        profile=profile,
        rate=list(run.rate),
    )


async def measure_setup(name: str, runs: dict[str, RunSettings]) -> list[Row]:
    """The real side: one cluster of the setup, every workload at every rate."""
    serve_args = shlex.split(SETUPS[name])
    rows = []
    with local_cluster(serve_args, expected_instances(serve_args)) as cluster:
        for workload, base in runs.items():
            run = base.model_copy(update={"url": cluster.url})
            target = await resolve_target(run)
            for index, rate in enumerate(run.rate):
                requests = build_workload(run.model_copy(update={"seed": run.seed + index}))
                real = await run_point(run, target, requests, rate)
                rows.append(Row(name, workload, rate, figures(real.summary), {}))
                print(f"real {name} {workload} {rate:g}: {rows[-1].real}", flush=True)
    return rows


def simulate_rows(rows: Sequence[Row], runs: dict[str, RunSettings], profile: str) -> None:
    """The simulated side of every measured point, with the setup's own settings."""
    step_profile = load_profile(profile)
    for row in rows:
        serve_args = shlex.split(SETUPS[row.setup])
        serve = serve_settings(ServeSettings, serve_args)
        run = runs[row.workload]
        index = list(run.rate).index(row.rate)
        simulated = simulate_point(
            sim_settings(run, serve, profile),
            step_profile,
            serve_settings(DispatchSettings, serve_args),
            serve_settings(ReschedulingSettings, serve_args),
            serve_settings(GatewaySettings, serve_args),
            row.rate,
            index,
        )
        row.simulated = figures(simulated.summary)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.0f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def format_row(row: Row) -> str:
    cells = [row.setup, row.workload, f"{row.rate:g}"]
    for metric, stat in METRICS:
        key = f"{metric}.{stat}"
        cells.append(f"{_ms(row.real[key])} / {_ms(row.simulated[key])} ({_pct(row.error(key))})")
    return "| " + " | ".join(cells) + " |"


def medians(rows: Sequence[Row]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for metric, stat in METRICS:
        key = f"{metric}.{stat}"
        errors = [abs(e) for e in (r.error(key) for r in rows) if e is not None]
        out[key] = statistics.median(errors) if errors else None
    return out


def render(rows: Sequence[Row], command: str, profile: str) -> str:
    header = "| setup | workload | rate | " + " | ".join(
        f"{m} {s} real / sim (err)" for m, s in METRICS
    )
    lines = [
        "# Simulator vs real runs on this machine",
        "",
        f"Command: `{command}`",
        "",
        f"Profile: `{profile}` (measured here with `pdserve profile`). Every point: the same",
        "requests and arrival times, real (`pdserve bench run`'s code on a `pdserve serve`",
        "cluster) and simulated (`pdserve sim`'s code), latencies in ms.",
        "",
        header + " |",
        "|" + " --- |" * (3 + len(METRICS)),
        *(format_row(r) for r in rows),
        "",
        "Median absolute error over the points:",
        "",
    ]
    for key, value in medians(rows).items():
        lines.append(f"- {key}: {_pct(value).lstrip('+')}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--rate", nargs="+", type=float, default=[0.3, 0.6])
    parser.add_argument("--num-requests", type=int, default=20)
    parser.add_argument("--profile", default="smollm2-135m-cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="benchmark/results/sim-validation")
    parser.add_argument(
        "--from-real",
        action="store_true",
        help="simulate the real points saved by an earlier run (OUTPUT-real.json) again",
    )
    args = parser.parse_args(argv)
    runs = {
        name: RunSettings(
            **WORKLOADS[name],
            num_requests=args.num_requests,
            rate=args.rate,
            seed=args.seed,
            progress=False,
            plots=False,
        )
        for name in args.workloads
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    real_file = out.with_name(out.name + "-real.json")
    if args.from_real:
        rows = [Row(**r) for r in json.loads(real_file.read_text())]
    else:
        rows = []
        for setup in args.setups:
            rows += asyncio.run(measure_setup(setup, runs))
            real_file.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    simulate_rows(rows, runs, args.profile)
    command = "python -m benchmark.sim_validation " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    out.with_suffix(".md").write_text(render(rows, command.strip(), args.profile))
    payload: dict[str, Any] = {"rows": [asdict(r) for r in rows], "median_error": medians(rows)}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    print(render(rows, command.strip(), args.profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
