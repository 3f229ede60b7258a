"""KV reserved for high-priority requests on real vLLM (issue 13): ``--priority-kv-reserve``.

A cluster of its own, 1P1D with every request disaggregated, vLLM's priority scheduling and
90% of the decode instance's KV reserved (about a minute to start). A long normal request
decodes there, holding more than half of the blocks a normal request may use; a second
normal prompt is then held at the gateway (its KV would not fit outside the reserve),
while a high-priority one sent after it is prefilled and pulled into the reserve at once.
The normal one is served when the first ends. Without the reserve the second normal
prompt would be prefilled first and pulled at once (the decode instance has room for
several of them), so the test fails if the reserve is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdserve.scheduler.dispatch import DispatchSettings
from tests.integration.helpers import ServeCluster, Stream, prompt_token_ids, wait_for

RESERVE = 0.9
WATERMARK = DispatchSettings().watermark  # the cluster runs the default
ARGS = (
    "--prefill 1 --decode 1 --short-prompt-tokens 0 --prefill-saturation-s 100000 "
    f"--kv-cache-gib 1 --priority-scheduling --priority-kv-reserve {RESERVE} "
    "--admission-wait-s 300"
)


@pytest.fixture(scope="module")
def reserved(logs: Path) -> Iterator[ServeCluster]:
    served = ServeCluster.start(logs / "priority-reserve", *ARGS.split(), expected=2)
    try:
        served.wait()
        yield served
    finally:
        served.process.stop(grace_s=20)


def prompt_tokens_for(cluster: ServeCluster) -> int:
    """A prompt holding more than half of the blocks a normal request may use on the decode
    instance (so two do not fit outside the reserve), from the sizes it reports."""
    (decode,) = [row for row in cluster.instances() if row["role"] == "decode"]
    total, block = decode["total_blocks"], decode["block_size"]
    normal = total - int((WATERMARK + RESERVE) * total)
    blocks = normal // 2 + 2
    assert 2 * blocks > normal and blocks < normal, (total, block, normal)
    assert blocks * 3 < total - normal, "the reserve must take the high-priority prompt"
    tokens = blocks * block - block // 4  # blocks, with room for 32 output tokens
    assert math.ceil((tokens + 1) / block) == blocks
    return tokens


def test_a_high_priority_prompt_takes_the_reserve_a_normal_one_waits(
    reserved: ServeCluster,
) -> None:
    tokens = prompt_tokens_for(reserved)
    first = Stream(reserved.url, prompt_token_ids(tokens, seed=71), max_tokens=300)
    wait_for(lambda: len(first.tokens) >= 3, 300, "the first normal request to decode")

    normal = Stream(reserved.url, prompt_token_ids(tokens, seed=72), max_tokens=8)
    high = Stream(reserved.url, prompt_token_ids(tokens, seed=73), max_tokens=8, priority=-1)
    high.wait()
    assert high.error is None, high.error
    assert not first.done.is_set(), "the first request must still decode (more max_tokens)"
    assert not normal.tokens, "the normal prompt must wait outside the reserve"

    first.wait()
    normal.wait()
    assert first.error is None and normal.error is None, (first.error, normal.error)
    assert len(normal.tokens) == 8
    assert normal.times[0] > high.times[0]
    assert normal.times[0] > first.times[-1], (
        "the normal prompt is placed when the first request's blocks are freed"
    )
    reserved.assert_no_leaks()
