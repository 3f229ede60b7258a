"""``PrefillRateMeter``: the prefill rate a load report carries, on step sequences whose rate
is known."""

from __future__ import annotations

import pytest

from pdserve.protocol.reports import PrefillRateMeter


def test_no_rate_before_a_step_computed_prompt_tokens() -> None:
    meter = PrefillRateMeter()
    meter.observe(0, 32, 0.05)  # a decode-only step says nothing of prefill
    meter.observe(100, 0, 0.0)  # nor an untimed one
    assert meter.tokens_per_s == 0.0


def test_full_prompt_steps_give_the_rate_the_queue_drains_at() -> None:
    meter = PrefillRateMeter()
    for _ in range(10):
        meter.observe(2048, 0, 1.0)
    assert meter.tokens_per_s == pytest.approx(2048.0)


def test_a_few_prompt_tokens_among_decodes_do_not_sink_the_rate() -> None:
    # 2,000 tokens/s measured, then a decoding instance's usual steps: a pulled request's
    # last token (one prompt token) in a 50 ms step of 63 decodes. A moving average of each
    # step's prompt tokens over its time falls to 20 tokens/s; the rate of the step time
    # those tokens took stays at the steps' token rate (64 tokens in 50 ms) or above.
    meter = PrefillRateMeter()
    meter.observe(2000, 0, 1.0)
    for _ in range(200):
        meter.observe(1, 63, 0.05)
    assert meter.tokens_per_s == pytest.approx(64 / 0.05)
    meter.observe(2000, 0, 1.0)  # and a prompt step counts by its tokens
    assert meter.tokens_per_s > 1900
