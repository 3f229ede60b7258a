"""How many instances a workload needs at a rate: a fluid lower bound from a step-time profile.

Why: a goal such as "adaptive meets the SLOs for 95% of the requests at rate R" is only worth
chasing where some placement can; this bound says where none can, whatever the policy.

The fluid model (no queueing, no variance, every instance busy all the time) of the
profile's linear step time ``base + token x prefill tokens + pair x attention pairs + seq x
decoding sequences + context x their context``, with each step no longer than the TPOT
objective T while it decodes:

- prompts cost their tokens and attention pairs (``p x p / 2`` for a prompt of ``p``);
  their steps' fixed cost is left out, since a prompt may ride in a decode step;
- decodes: by Little's law, ``rate x mean output x T`` sequences decode at once, each adding
  ``seq + context x c`` to a step (``c`` the mean context a decode attends over, weighted
  by output length: prompt plus half the output). An instance decoding ``n`` of them in
  steps of T spends ``base`` of each step on the fixed cost, ``n x`` per-sequence on them,
  and the rest on prompt tokens; the fewest instances do so with ``n`` as large as T
  allows and no prompt tokens in their steps, which gives the decode term
  ``rate x mean output x per-sequence x T / (T - base)``.

The sum is a lower bound on the busy instances a rate needs under the TPOT objective (a TTFT
objective only adds queueing). Over the instances there are, it is the least utilization
the rate implies: near 1, no policy meets the SLOs for most requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.sim.profile import StepProfile


@dataclass(frozen=True)
class FluidNeed:
    """Busy instances a rate needs at least: for prompts, for decodes, and both."""

    prefill: float
    decode: float

    @property
    def total(self) -> float:
        return self.prefill + self.decode


def fluid_need(
    profile: StepProfile,
    lengths: Sequence[tuple[int, int]],
    rate: float,
    tpot_s: float,
) -> FluidNeed:
    """The bound of the module docstring for requests of ``(prompt, output)`` tokens
    arriving at ``rate`` per second; infinite decode need if a step's fixed cost alone
    reaches the TPOT objective."""
    if not lengths or rate <= 0:
        return FluidNeed(0.0, 0.0)
    c = profile.coefficients
    n = len(lengths)
    prompt_s = sum(c.prefill_token_s * p + c.attention_pair_s * p * p / 2 for p, _ in lengths)
    outputs = sum(o for _, o in lengths)
    if outputs == 0:
        return FluidNeed(rate * prompt_s / n, 0.0)
    if tpot_s <= c.base_s:
        return FluidNeed(rate * prompt_s / n, float("inf"))
    context = sum(o * (p + o / 2) for p, o in lengths) / outputs
    per_seq = c.decode_seq_s + c.decode_context_s * context
    decode = rate * (outputs / n) * per_seq * tpot_s / (tpot_s - c.base_s)
    return FluidNeed(rate * prompt_s / n, decode)
