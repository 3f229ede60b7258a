"""Epochs: runs of decode-only steps, computed at once (see ``pdserve.sim.engine``).

In a step where every running request decodes one token and nothing can be admitted, the
next step is the same but for one more context token per request; that repeats until a
request reaches its ``max_tokens`` or a request needs a block none is free for. Such a run
is planned here in one go: how many steps, and their durations from the profile.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdserve.sim.legs import Leg
from pdserve.sim.profile import StepProfile, StepWork

# Sequences from which numpy beats a Python loop at counting an epoch's new blocks.
_NUMPY_FROM = 64
# Steps from which numpy beats a Python loop at an epoch's step times.
_NUMPY_STEPS_FROM = 256


@dataclass
class Epoch:
    """Consecutive decode-only steps of the same requests; ``ends[i]`` is step i's end."""

    ends: list[float]
    steps: list[float]
    last: int  # steps in the epoch (lowered when something interrupts it)
    applied: int = 0


def epoch_length(running: Sequence[Leg], free_blocks: int, block_size: int) -> int:
    """Decode-only steps before the first leg finishes or a block is missing (>= 1).

    Step 1 has its blocks already; step j needs a new block for a leg when its
    ``num_computed + j`` passes the blocks it covers: first at
    ``j = covered * block_size - computed + 1``, then every ``block_size`` steps.
    """
    steps = min(leg.max_tokens - leg.num_output for leg in running)
    if steps <= 1:
        return 1
    firsts = [leg.covered_blocks * block_size - leg.num_computed + 1 for leg in running]
    if len(firsts) > _NUMPY_FROM:
        array = np.array(firsts, dtype=np.int64)

        def needed(k: int) -> int:
            return int(np.maximum(0, (k - array) // block_size + 1).sum())

    else:  # fewer sequences: plain Python is faster than numpy's per-call cost

        def needed(k: int) -> int:
            return sum((k - first) // block_size + 1 for first in firsts if first <= k)

    if needed(steps) <= free_blocks:
        return steps
    low, high = 1, steps  # needed(low) <= free_blocks < needed(high)
    while high - low > 1:
        middle = (low + high) // 2
        if needed(middle) <= free_blocks:
            low = middle
        else:
            high = middle
    return low


def epoch_durations(profile: StepProfile, seqs: int, context: int, steps: int) -> list[float]:
    """Durations of ``steps`` decode steps of ``seqs`` sequences attending over ``context``
    tokens in the first, ``seqs`` more in each next one.

    A profile linear in the context (the documented model) gives an arithmetic series,
    checked at its last step; any other profile is asked step by step. (Short series in
    plain Python, long ones in numpy: the same floats either way.)
    """

    def step(j: int) -> float:
        return profile.step_seconds(
            StepWork(decode_seqs=seqs, decode_context_tokens=context + j * seqs)
        )

    first, second, last = step(0), step(1), step(steps - 1)
    slope = second - first
    if math.isclose(first + (steps - 1) * slope, last, rel_tol=1e-9, abs_tol=1e-12):
        if steps > _NUMPY_STEPS_FROM:
            result: list[float] = (first + slope * np.arange(steps)).tolist()
            return result
        return [first + slope * j for j in range(steps)]
    return [step(j) for j in range(steps)]


def epoch_ends(now: float, durations: Sequence[float]) -> list[float]:
    """When each step ends: ``now`` plus the running sum of the durations."""
    if len(durations) > _NUMPY_STEPS_FROM:
        result: list[float] = (now + np.cumsum(durations)).tolist()
        return result
    return [now + total for total in itertools.accumulate(durations)]
