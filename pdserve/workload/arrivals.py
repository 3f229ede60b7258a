"""When requests are sent: open-loop arrival processes, or a closed loop of fixed concurrency.

Open loop (Poisson, gamma) is how serving papers (vLLM, DistServe, Splitwise) load a system:
arrivals do not wait for the server, so queueing delay shows up in TTFT as it would in
production. Gamma inter-arrival times with shape = ``burstiness`` and the same mean rate
generalize Poisson (shape 1): below 1 requests come in bursts, above 1 more evenly spaced;
this is the ``--burstiness`` of ``vllm bench serve``. A closed loop (N clients, each sending
its next request when the previous one finishes) measures capacity at a fixed concurrency
and cannot overload the server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

ArrivalKind = Literal["poisson", "gamma", "closed"]


@dataclass(frozen=True)
class OpenLoop:
    """Send times, in seconds from the start of the run, one per request, non-decreasing."""

    times: tuple[float, ...]


@dataclass(frozen=True)
class ClosedLoop:
    """``concurrency`` requests in flight at all times until the requests run out."""

    concurrency: int


Schedule = OpenLoop | ClosedLoop


def gamma_times(n: int, rate: float, burstiness: float, seed: int) -> tuple[float, ...]:
    """``n`` send times with gamma(shape=burstiness, mean 1/rate) gaps; the first at 0.

    ``rate`` = inf sends everything at once (a pure burst, as in ``vllm bench serve``).
    """
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be positive, got {rate}, {burstiness}")
    if math.isinf(rate):
        return (0.0,) * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(n - 1, 0))
    return (0.0, *np.cumsum(gaps).tolist())


def poisson_times(n: int, rate: float, seed: int) -> tuple[float, ...]:
    """Poisson arrivals: exponential gaps, i.e. gamma with shape 1."""
    return gamma_times(n, rate, 1.0, seed)


def make_schedule(
    kind: ArrivalKind, load: float, n: int, burstiness: float = 1.0, seed: int = 0
) -> Schedule:
    """The schedule of one load point: ``load`` is a rate (req/s) or a concurrency."""
    if kind == "poisson":
        return OpenLoop(poisson_times(n, load, seed))
    if kind == "gamma":
        return OpenLoop(gamma_times(n, load, burstiness, seed))
    if load < 1 or load != int(load):
        raise ValueError(f"closed-loop concurrency must be a positive integer, got {load}")
    return ClosedLoop(int(load))
