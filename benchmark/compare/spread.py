"""Every ratio of the candidate setup to the others, over the repetitions: median, spread
(min-max) and what may be said of it (``Outcome``).

On a shared 2-core machine one pass per setup is noise: two decode-heavy passes of the same
setups gave ratios of opposite sign (issue 13). A ratio is therefore computed within each
repetition (setups of one repetition got the same prompts, one after the other), and a claim
is made only from the spread of those ratios: a spread that crosses 1.0, or lies within
``TIE_MARGIN`` of it, is a tie; a P99 from
fewer than ``MIN_P99_REQUESTS`` requests, or fewer than ``MIN_REPETITIONS`` ratios, is no
claim at all.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from benchmark.compare.models import Outcome, RatioSpread, SetupResult
from benchmark.compare.settings import MIN_P99_REQUESTS, MIN_REPETITIONS, TIE_MARGIN
from benchmark.compare.targets import goodput_target, groups
from pdserve.workload.metrics import Summary

BEST_BASELINE = "best of the others"
GOODPUT_AT_KNEE = "goodput at knee"
PEAK_GOODPUT = "peak goodput"
# (metric, Summary field, statistic): latencies at equal load, lower is better.
LATENCY_METRICS = (
    ("TTFT mean", "ttft_ms", "mean"),
    ("TTFT P99", "ttft_ms", "p99"),
    ("TPOT mean", "tpot_ms", "mean"),
    ("TPOT P99", "tpot_ms", "p99"),
    ("ITL P99", "itl_ms", "p99"),
    # Only where the workload has priority classes (``--high-priority-fraction``).
    ("high-priority TTFT P99", "ttft_ms_high", "p99"),
    ("normal TTFT P99", "ttft_ms_normal", "p99"),
)
CLASS_FIELDS = ("ttft_ms_high", "ttft_ms_normal")
Better = Literal["higher", "lower"]
# One repetition's setups by name.
Repetition = dict[str, SetupResult]


@dataclass(frozen=True)
class Sample:
    """One repetition's ratio and the fewest completed requests behind it."""

    ratio: float | None
    requests: int | None = None


def median_spread(ratios: Sequence[float | None]) -> tuple[float | None, ...]:
    """(median, min, max) of the measured ratios; Nones where none was."""
    values = [r for r in ratios if r is not None]
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


def ratio_outcome(
    ratios: Sequence[float | None], better: Better, min_requests: int | None, p99: bool
) -> Outcome:
    """The rule: a spread crossing 1.0, or within ``TIE_MARGIN`` of it, is a tie; otherwise a
    win or loss only from enough repetitions and, for a P99, enough requests per point."""
    _, low, high = median_spread(ratios)
    if low is None or high is None:
        return Outcome.UNMEASURED
    if low <= 1.0 <= high or (low >= 1.0 - TIE_MARGIN and high <= 1.0 + TIE_MARGIN):
        return Outcome.TIE
    if p99 and (min_requests is None or min_requests < MIN_P99_REQUESTS):
        return Outcome.TOO_FEW_REQUESTS
    if sum(r is not None for r in ratios) < MIN_REPETITIONS:
        return Outcome.TOO_FEW_REPETITIONS
    wins = low > 1.0 if better == "higher" else high < 1.0
    return Outcome.BETTER if wins else Outcome.WORSE


def spread_row(
    mix: str | None,
    metric: str,
    pair: tuple[str, str],
    load: float | None,
    better: Better,
    samples: Sequence[Sample],
) -> RatioSpread:
    """One table row: the samples of every repetition, summarized."""
    ratios = [s.ratio for s in samples]
    counts = [s.requests for s in samples if s.ratio is not None and s.requests is not None]
    fewest = min(counts) if counts else None
    median, low, high = median_spread(ratios)
    return RatioSpread(
        mix=mix,
        metric=metric,
        setup=pair[0],
        baseline=pair[1],
        load=load,
        better=better,
        ratios=ratios,
        median=median,
        low=low,
        high=high,
        min_requests=fewest,
        outcome=ratio_outcome(ratios, better, fewest, p99="P99" in metric),
    )


def _goodput_samples(
    reps: Sequence[Repetition], candidate: str, baseline: str
) -> tuple[list[Sample], list[Sample]]:
    """(at the baseline's knee, peak) per repetition."""
    knee, peak = [], []
    for rep in reps:
        found = None
        if candidate in rep and baseline in rep:
            found = goodput_target(rep[candidate], rep[baseline])
        knee.append(Sample(found.ratio if found else None))
        peak.append(Sample(found.peak_ratio if found else None))
    return knee, peak


def _best_baseline(per_baseline: Sequence[Sequence[Sample]]) -> list[Sample]:
    """Per repetition, the ratio to the best baseline: the smallest ratio, where every
    baseline has one (otherwise the best one is not known)."""
    out = []
    for samples in zip(*per_baseline, strict=True):
        ratios = [s.ratio for s in samples]
        known = [r for r in ratios if r is not None]
        out.append(Sample(min(known) if len(known) == len(ratios) else None))
    return out


def _latency_sample(mine: Summary | None, theirs: Summary | None, field: str, stat: str) -> Sample:
    """The ratio of one statistic and the fewest requests behind it (a class's own count)."""
    if mine is None or theirs is None:
        return Sample(None)
    ours, others = getattr(mine, field), getattr(theirs, field)
    if ours is None or others is None:
        return Sample(None)
    a, b = getattr(ours, stat), getattr(others, stat)
    ratio = a / b if a is not None and b else None
    if field in CLASS_FIELDS:
        return Sample(ratio, min(ours.n, others.n))
    return Sample(ratio, min(mine.completed, theirs.completed))


def _at(rep: Repetition, name: str, load: float) -> Summary | None:
    return rep[name].summaries().get(load) if name in rep else None


def _latency_rows(
    mix: str | None, reps: Sequence[Repetition], pair: tuple[str, str]
) -> list[RatioSpread]:
    """At every load both setups were measured at: each latency's ratio."""
    candidate, baseline = pair
    loads = sorted(
        {
            load
            for rep in reps
            if candidate in rep and baseline in rep
            for load in set(rep[candidate].summaries()) & set(rep[baseline].summaries())
        }
    )
    rows = []
    for load in loads:
        for metric, field, stat in LATENCY_METRICS:
            samples = [
                _latency_sample(_at(rep, candidate, load), _at(rep, baseline, load), field, stat)
                for rep in reps
            ]
            if field in CLASS_FIELDS and all(s.ratio is None for s in samples):
                continue  # no priority classes in this workload
            rows.append(spread_row(mix, metric, pair, load, "lower", samples))
    return rows


def _goodput_rows(
    mix: str | None, reps: Sequence[Repetition], candidate: str, baselines: Sequence[str]
) -> list[RatioSpread]:
    """Goodput at each baseline's knee, peak goodput, and at the knee of the best baseline."""
    rows: list[RatioSpread] = []
    knees = []
    for baseline in baselines:
        knee, peak = _goodput_samples(reps, candidate, baseline)
        knees.append(knee)
        pair = (candidate, baseline)
        rows.append(spread_row(mix, GOODPUT_AT_KNEE, pair, None, "higher", knee))
        rows.append(spread_row(mix, PEAK_GOODPUT, pair, None, "higher", peak))
    if len(baselines) > 1:
        best = _best_baseline(knees)
        pair = (candidate, BEST_BASELINE)
        rows.append(spread_row(mix, GOODPUT_AT_KNEE, pair, None, "higher", best))
    return rows


def repeated_ratios(
    setups: Sequence[SetupResult], candidate: str, goodput: bool = True
) -> list[RatioSpread]:
    """Every ratio of ``candidate`` to every other setup, per mix, over the repetitions;
    goodput rows only where an SLO was given (``goodput``)."""
    by_mix: dict[str | None, list[Repetition]] = {}
    for (mix, _), group in groups(setups).items():
        measured = {e.name: e for e in group if e.points and not e.error}
        by_mix.setdefault(mix, []).append(measured)
    rows: list[RatioSpread] = []
    for mix, reps in by_mix.items():
        names = [e.name for e in setups if e.mix == mix]
        baselines = [n for n in dict.fromkeys(names) if n != candidate]
        if goodput:
            rows += _goodput_rows(mix, reps, candidate, baselines)
        for baseline in baselines:
            rows += _latency_rows(mix, reps, (candidate, baseline))
    return rows
