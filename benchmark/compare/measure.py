"""Starting a setup and measuring it: one load point, or the warm-up, with ``bench run``'s
client and metrics. ``Comparison`` takes these as arguments, so tests hand it fakes."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from benchmark.client import drive, resolve_target
from benchmark.compare.settings import POINTS_DIR, WARMUP_OUTPUT_TOKENS, CompareSettings
from benchmark.run import RunSettings, run_point
from benchmark.setups import RunningSetup, SetupPlan
from pdserve.workload.arrivals import ClosedLoop
from pdserve.workload.metrics import PointResult
from pdserve.workload.workloads import BenchRequest


class Running(Protocol):
    """A started setup (``benchmark.setups.RunningSetup``; tests use fakes)."""

    @property
    def name(self) -> str: ...

    @property
    def endpoint(self) -> str: ...

    def counters(self) -> dict[str, float]: ...

    def check_alive(self) -> None: ...

    def stop(self) -> None: ...


def start_setup(plan: SetupPlan, log_dir: Path, timeout_s: float) -> Running:
    running = RunningSetup(plan, log_dir)
    try:
        running.start(timeout_s)
    except BaseException:
        running.stop()
        raise
    return running


def point_settings(
    settings: CompareSettings, setup: str, endpoint: str, seed: int, **update: Any
) -> RunSettings:
    """``bench run``'s settings for one load point of one setup."""
    values = settings.model_dump(include=set(RunSettings.model_fields))
    values |= {
        "url": endpoint,
        "label": setup,
        "model": None,  # every setup serves one model; the client asks for its name
        "api_key": None,
        "seed": seed,
        "plots": False,
        "output_dir": str(Path(settings.output_dir) / POINTS_DIR),
    }
    return RunSettings.model_validate(values | update)


def measure_point(point: RunSettings, load: float, requests: Sequence[BenchRequest]) -> PointResult:
    async def go() -> PointResult:
        target = await resolve_target(point)
        return await run_point(point, target, requests, load)

    return asyncio.run(go())


def warm_up(point: RunSettings, requests: Sequence[BenchRequest], concurrency: int) -> int:
    """Sends short versions of ``requests`` (closed loop, a conversation's turns as requests
    of their own); returns how many succeeded."""
    short = [
        dataclasses.replace(
            r, output_len=min(r.output_len, WARMUP_OUTPUT_TOKENS), conversation=None, user=None
        )
        for r in requests
    ]

    async def go() -> int:
        target = await resolve_target(point)
        outcome = await drive(
            target, short, ClosedLoop(max(1, concurrency)), point.time_limit_s, progress=False
        )
        return sum(r.success for r in outcome.records)

    return asyncio.run(go())


Measure = Callable[[RunSettings, float, Sequence[BenchRequest]], PointResult]
Start = Callable[[SetupPlan, Path, float], Running]
Warm = Callable[[RunSettings, Sequence[BenchRequest], int], int]
