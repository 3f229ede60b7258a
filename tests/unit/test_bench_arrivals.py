"""Arrival processes: mean rate, burstiness, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.workload.arrivals import (
    ClosedLoop,
    OpenLoop,
    gamma_times,
    make_schedule,
    poisson_times,
)


def gaps(times: tuple[float, ...]) -> np.ndarray:
    return np.diff(np.asarray(times))


def test_poisson_mean_rate_and_exponential_gaps() -> None:
    times = poisson_times(20_000, rate=4.0, seed=1)
    assert times[0] == 0.0 and all(np.diff(times) >= 0)
    assert len(times) / times[-1] == pytest.approx(4.0, rel=0.03)
    # Exponential gaps: coefficient of variation 1.
    assert gaps(times).std() / gaps(times).mean() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_keeps_the_rate_and_changes_the_spread(burstiness: float) -> None:
    times = gamma_times(20_000, rate=10.0, burstiness=burstiness, seed=2)
    assert len(times) / times[-1] == pytest.approx(10.0, rel=0.05)
    # Gamma with shape k has coefficient of variation 1 / sqrt(k).
    cv = gaps(times).std() / gaps(times).mean()
    assert cv == pytest.approx(1 / np.sqrt(burstiness), rel=0.08)


def test_seeded_and_infinite_rate() -> None:
    assert poisson_times(50, 2.0, seed=3) == poisson_times(50, 2.0, seed=3)
    assert poisson_times(50, 2.0, seed=3) != poisson_times(50, 2.0, seed=4)
    assert poisson_times(5, float("inf"), seed=0) == (0.0,) * 5


def test_make_schedule_kinds() -> None:
    assert isinstance(make_schedule("gamma", 2.0, 10, burstiness=0.5), OpenLoop)
    assert make_schedule("closed", 4, 10) == ClosedLoop(4)
    with pytest.raises(ValueError):
        make_schedule("closed", 2.5, 10)
    with pytest.raises(ValueError):
        make_schedule("poisson", 0.0, 10)
