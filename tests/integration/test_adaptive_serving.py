"""The adaptive policy on real vLLM (issue 13): two ``both`` instances, and what each serves
changes with the load, request by request, with plain vLLM's greedy outputs.

A cluster of its own, ``--prefill 0 --decode 0 --both 2 --policy adaptive`` (``--prefill``
and ``--decode`` default to 1) with lenient SLOs (so that the CPU's
step times cannot make the test's placements go another way), and a plain vLLM of its own
as the reference: the module runs before the session's shared cluster starts, since seven
vLLM processes do not fit this machine's memory. About a minute and a half to start.

What the policy must do here (``pdserve.scheduler.adaptive``): a lone request on an idle
cluster is served whole on one instance (prefill and decode, no KV moved); a prompt sent
while that instance decodes is prefilled on the other instance, which runs no decodes
(rule 2), and its decode joins the decoding one (rule 1, bin-packing): the first instance
goes from serving whole requests to decoding another's prefill, the second from idle to
prefilling for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import (
    MODEL,
    PlainVLLM,
    ServeCluster,
    Stream,
    http_json,
    prompt_token_ids,
    wait_for,
)

ARGS = (
    "--prefill 0 --decode 0 --both 2 --policy adaptive"
    " --slo-ttft-ms 120000 --slo-tpot-ms 5000 --kv-cache-gib 1"
)


@pytest.fixture(scope="module")
def adaptive(logs: Path) -> Iterator[tuple[ServeCluster, PlainVLLM]]:
    reference = PlainVLLM.start(logs / "adaptive-reference")
    served = ServeCluster.start(logs / "adaptive", *ARGS.split(), expected=2)
    try:
        served.wait()
        reference.wait()
        yield served, reference
    finally:
        served.process.stop(grace_s=20)
        reference.process.stop(grace_s=20)


def test_what_an_instance_serves_changes_with_the_load(
    adaptive: tuple[ServeCluster, PlainVLLM],
) -> None:
    cluster, reference = adaptive
    lone, joining = prompt_token_ids(400, seed=31), prompt_token_ids(300, seed=32)
    before = cluster.kv_bytes_received()

    stream = Stream(cluster.url, lone, max_tokens=160)
    wait_for(lambda: len(stream.tokens) >= 3, 300, "the lone request to decode")
    (decoder,) = cluster.placed().values()
    assert cluster.kv_bytes_received() == before, (
        "a lone request on an idle cluster is served whole"
    )

    body = {"model": MODEL, "prompt": joining, "max_tokens": 16, "temperature": 0}
    status, answer = http_json(cluster.url + "/v1/completions", body, timeout=300)
    assert status == 200, answer
    assert not stream.done.is_set(), "the lone request must still decode (more max_tokens)"
    stream.wait()
    assert stream.error is None, stream.error

    after = cluster.kv_bytes_received()
    pulled = {i for i in after if after[i] > before[i]}
    assert pulled == {decoder}, (
        f"the joining prompt should prefill on the instance without decodes and decode on "
        f"{decoder}, which pulls its KV; pulled: {pulled}"
    )

    shown = http_json(cluster.url + "/admin/policy")[1]
    joined, opened = shown["recent"][:2]
    assert (opened["decode"], opened["decode_rule"], opened["prefill"]) == (
        decoder,
        "opened",
        decoder,
    ), shown
    assert (joined["decode"], joined["decode_rule"], joined["prefill_rule"]) == (
        decoder,
        "packed",
        "free",
    ), shown
    assert shown["policy"] == "adaptive" and shown["equations"] > 0, shown

    want_lone = reference.complete(lone, 160, ignore_eos=True)["choices"][0]["token_ids"]
    assert stream.tokens == want_lone
    want_joining = reference.complete(joining, 16)["choices"][0]["text"]
    assert answer["choices"][0]["text"] == want_joining
    cluster.assert_no_leaks()
