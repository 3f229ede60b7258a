"""The fluid bound on the instances a rate needs, against hand-computed figures."""

from __future__ import annotations

import math

import pytest

from pdserve.sim.capacity import fluid_need
from pdserve.sim.profile import load_profile


def test_the_bound_by_hand() -> None:
    profile = load_profile("qwen3-32b-h20")
    c = profile.coefficients
    lengths = [(1000, 200), (3000, 0), (500, 600)]
    need = fluid_need(profile, lengths, rate=6.0, tpot_s=0.05)
    prompt_s = sum(c.prefill_token_s * p + c.attention_pair_s * p * p / 2 for p, _ in lengths)
    assert need.prefill == pytest.approx(6.0 * prompt_s / 3)
    # Little's law: 6/s x 800/3 tokens x 50 ms decode at once; an instance holds as many as
    # fill a 50 ms step after its fixed cost.
    context = (200 * (1000 + 100) + 600 * (500 + 300)) / 800
    per_seq = c.decode_seq_s + c.decode_context_s * context
    at_once = 6.0 * (800 / 3) * 0.05
    per_instance = (0.05 - c.base_s) / per_seq
    assert need.decode == pytest.approx(at_once / per_instance)
    assert need.total == pytest.approx(need.prefill + need.decode)


def test_a_tighter_tpot_needs_more_decode_instances_and_a_step_cost_floor_is_infinite() -> None:
    profile = load_profile("qwen3-32b-h20")
    lengths = [(1000, 200)]
    loose, tight = (fluid_need(profile, lengths, 5.0, t) for t in (0.05, 0.03))
    assert tight.decode > loose.decode and tight.prefill == loose.prefill
    floor = profile.coefficients.base_s
    assert math.isinf(fluid_need(profile, lengths, 5.0, floor).decode)
    assert fluid_need(profile, [], 5.0, 0.05).total == 0.0
