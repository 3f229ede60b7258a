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

import numpy as np

from pdserve.sim.legs import Leg
from pdserve.sim.profile import StepProfile, StepWork

# Sequences from which numpy beats a Python loop at counting an epoch's new blocks.
_NUMPY_FROM = 64
# Steps from which numpy beats a Python loop at an epoch's step times.
_NUMPY_STEPS_FROM = 256


class Epoch:
    """Consecutive decode-only steps of the same requests; ``ends[i]`` is step i's end.

    What a load report needs of the running requests is kept from the start, so that a
    report in the middle of the epoch is made without a pass over them (``intact``: nothing
    changed the running requests since): their number, their tokens, the blocks allocated
    by the steps applied so far, and ``blocks_by(k)``, the new blocks the requests need
    once ``k`` steps from the start have their tokens.
    """

    __slots__ = (
        "_by_first",
        "_needed",
        "_residues",
        "allocated",
        "applied",
        "block_size",
        "context",
        "ends",
        "intact",
        "last",
        "seqs",
        "steps",
        "tokens",
    )

    def __init__(self, ends: list[float], steps: list[float], last: int, applied: int = 0) -> None:
        self.ends = ends
        self.steps = steps
        self.last = last  # steps in the epoch (lowered when something interrupts it)
        self.applied = applied
        self.intact = False
        self.seqs = 0
        self.tokens = 0  # prompt + output tokens of the running requests at the start
        self.context = 0  # their computed tokens + 1 (the step-time model's decode context)
        self.allocated = 0  # blocks the applied steps allocated
        self.block_size = 1
        self._by_first: dict[int, int] = {}
        self._residues: list[int] = []
        self._needed: list[int] = []

    def plan_blocks(self, firsts: Sequence[int], block_size: int) -> None:
        """``firsts``: per request, the first step count at which it needs a new block
        (then every ``block_size`` steps), as ``epoch_length`` counts them."""
        self.block_size = block_size
        self._residues = [0] * block_size
        self._needed = [0]
        for first in firsts:
            if first <= 0:  # needs blocks already (not in an epoch's start, but exact)
                self._residues[first % block_size] += 1
                self._needed[0] += (0 - first) // block_size + 1
            else:
                self._by_first[first] = self._by_first.get(first, 0) + 1

    def blocks_by(self, k: int) -> int:
        """New blocks needed over the start's once ``k`` steps have their tokens: the
        difference N(k) - N(k - 1) is how many requests cross a block boundary at k."""
        needed = self._needed
        if k < len(needed):
            return needed[k]
        residues, by_first, bs = self._residues, self._by_first, self.block_size
        total = needed[-1]
        for j in range(len(needed), k + 1):
            count = by_first.get(j)
            if count:
                residues[j % bs] += count
            total += residues[j % bs]
            needed.append(total)
        return total


def epoch_length(running: Sequence[Leg], free_blocks: int, block_size: int) -> int:
    """Decode-only steps before the first leg finishes or a block is missing (>= 1).

    Step 1 has its blocks already; step j needs a new block for a leg when its
    ``num_computed + j`` passes the blocks it covers: first at
    ``j = covered * block_size - computed + 1``, then every ``block_size`` steps.
    """
    return plan_epoch(running, free_blocks, block_size)[0]


def plan_epoch(running: Sequence[Leg], free_blocks: int, block_size: int) -> tuple[int, list[int]]:
    """``epoch_length`` and each leg's first step needing a new block (empty for 1 step)."""
    steps = min(leg.max_tokens - leg.num_output for leg in running)
    if steps <= 1:
        return 1, []
    firsts = [
        (leg.own_blocks + leg.hit_blocks) * block_size - leg.num_computed + 1 for leg in running
    ]
    if len(firsts) > _NUMPY_FROM:
        array = np.array(firsts, dtype=np.int64)

        def needed(k: int) -> int:
            return int(np.maximum(0, (k - array) // block_size + 1).sum())

    else:  # fewer sequences: plain Python is faster than numpy's per-call cost

        def needed(k: int) -> int:
            return sum((k - first) // block_size + 1 for first in firsts if first <= k)

    if needed(steps) <= free_blocks:
        return steps, firsts
    low, high = 1, steps  # needed(low) <= free_blocks < needed(high)
    while high - low > 1:
        middle = (low + high) // 2
        if needed(middle) <= free_blocks:
            low = middle
        else:
            high = middle
    return low, firsts


def epoch_durations(profile: StepProfile, seqs: int, context: int, steps: int) -> list[float]:
    """Durations of ``steps`` decode steps of ``seqs`` sequences attending over ``context``
    tokens in the first, ``seqs`` more in each next one.

    A profile linear in the context (the documented model) gives an arithmetic series,
    checked at its last step; any other profile is asked step by step. (Short series in
    plain Python, long ones in numpy: the same floats either way.)
    """

    if type(profile).step_seconds is StepProfile.step_seconds:
        # StepProfile's own model, without a StepWork per call: the same sum (its prefill
        # terms are 0.0, which adding leaves every float as it was).
        c = profile.coefficients
        base, per_seq, per_token = c.base_s, c.decode_seq_s * seqs, c.decode_context_s

        def step(j: int) -> float:
            return base + per_seq + per_token * (context + j * seqs)

    else:

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
