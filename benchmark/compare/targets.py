"""The issue's targets, measured and not asserted: P99 ITL of every xPyD setup against every
colocated one at equal rate, and goodput at the colocated baseline's knee."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from benchmark.compare.models import GoodputTarget, ItlTarget, SetupResult, Targets
from pdserve.workload.metrics import Summary

# DistServe's attainment target: the knee is the highest load still meeting it.
KNEE_ATTAINMENT = 0.9
ITL_TARGET = 0.5  # 1P1D's P99 ITL at most this times colocated's, at equal rate
GOODPUT_TARGET = 1.3  # 1P1D's goodput at least this times colocated's, at the knee


def knee_load(points: dict[float, Summary]) -> float | None:
    """The highest load still meeting the SLOs for ``KNEE_ATTAINMENT`` of requests."""
    if not points:
        return None
    meeting = [
        load
        for load, s in points.items()
        if s.slo_attainment is not None and s.slo_attainment >= KNEE_ATTAINMENT
    ]
    return max(meeting) if meeting else min(points)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def itl_targets(setup: SetupResult, baseline: SetupResult) -> list[ItlTarget]:
    mine, base = setup.summaries(), baseline.summaries()
    rows = []
    for load in sorted(set(mine) & set(base)):
        ratio = _ratio(mine[load].itl_ms.p99, base[load].itl_ms.p99)
        rows.append(
            ItlTarget(
                setup=setup.name,
                baseline=baseline.name,
                load=load,
                p99_itl_ms=mine[load].itl_ms.p99,
                baseline_p99_itl_ms=base[load].itl_ms.p99,
                ratio=ratio,
                met=None if ratio is None else ratio <= ITL_TARGET,
            )
        )
    return rows


def goodput_target(setup: SetupResult, baseline: SetupResult) -> GoodputTarget | None:
    """None where the baseline has no goodput (no SLO was given)."""
    mine, base = setup.summaries(), baseline.summaries()
    if not any(s.goodput is not None for s in base.values()):
        return None
    knee = knee_load(base)
    goodput = mine[knee].goodput if knee in mine else None
    baseline_goodput = base[knee].goodput if knee is not None else None
    at_knee = _ratio(goodput, baseline_goodput)
    peak = _ratio(
        max((s.goodput or 0.0 for s in mine.values()), default=None),
        max((s.goodput or 0.0 for s in base.values()), default=None),
    )
    return GoodputTarget(
        setup=setup.name,
        baseline=baseline.name,
        knee=knee,
        goodput=goodput,
        baseline_goodput=baseline_goodput,
        ratio=at_knee,
        met=None if at_knee is None else at_knee >= GOODPUT_TARGET,
        peak_ratio=peak,
    )


Group = tuple[str | None, int | None]  # (mix, repetition): setups measured side by side


def groups(setups: Sequence[SetupResult]) -> dict[Group, list[SetupResult]]:
    """The setups by (mix, repetition), in the order they ran: only setups of one group met
    the same prompts, so only they are compared with each other."""
    out: dict[Group, list[SetupResult]] = {}
    for entry in setups:
        out.setdefault((entry.mix, entry.repetition), []).append(entry)
    return out


def evaluate_targets(setups: Sequence[SetupResult | Mapping[str, Any]]) -> Targets:
    """The issue's targets (measured, not asserted) for every xPyD setup vs every colocated,
    within each repetition and mix (version 1: the one pass)."""
    measured = [SetupResult.model_validate(s) if isinstance(s, Mapping) else s for s in setups]
    targets = Targets()
    for (mix, repetition), group in groups(measured).items():
        found = _group_targets(group)
        where = {"mix": mix, "repetition": repetition}
        targets.p99_itl += [row.model_copy(update=where) for row in found.p99_itl]
        targets.goodput += [row.model_copy(update=where) for row in found.goodput]
    return targets


def _group_targets(measured: Sequence[SetupResult]) -> Targets:
    colocated = [s for s in measured if s.spec.both > 0 and s.points]
    disaggregated = [s for s in measured if s.spec.prefill > 0 and s.points]
    targets = Targets()
    for d in disaggregated:
        for c in colocated:
            targets.p99_itl += itl_targets(d, c)
            goodput = goodput_target(d, c)
            if goodput is not None:
                targets.goodput.append(goodput)
    return targets
