"""Roles are preferences (issue 13): ``pdserve serve --prefill 1 --decode 0`` is a cluster that
answers, every request served whole on its prefill instance with plain vLLM's greedy output;
priorities reach vLLM's priority scheduler (``--priority-scheduling``) and bad ones are 400s.

One instance of its own (about a minute to start on a CPU machine); the session's plain vLLM
is the reference.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import MODEL, PlainVLLM, ServeCluster, http_json, prompt_token_ids


@pytest.fixture(scope="module")
def prefill_only(logs: Path) -> Iterator[ServeCluster]:
    served = ServeCluster.start(
        logs / "prefill-only",
        *"--prefill 1 --decode 0 --kv-cache-gib 1 --priority-scheduling".split(),
        expected=1,
    )
    try:
        served.wait()
        yield served
    finally:
        served.process.stop(grace_s=20)


def completion(prompt: object, **extra: object) -> dict[str, object]:
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 16,
        "temperature": 0,
        "return_token_ids": True,
        **extra,
    }


def test_health_and_models_say_it_serves_colocated(prefill_only: ServeCluster) -> None:
    status, health = http_json(prefill_only.url + "/health")
    assert status == 200, health
    assert health["serving"] == "colocated-only"
    assert health["roles"] == {"prefill": 1, "decode": 0, "both": 0}
    status, models = http_json(prefill_only.url + "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [MODEL]


def test_greedy_outputs_match_plain_vllm(prefill_only: ServeCluster, reference: PlainVLLM) -> None:
    """A long token-id prompt (past --short-prompt-tokens: pd would disaggregate it) and a
    short text prompt, each served whole on the prefill instance."""
    for prompt in (prompt_token_ids(300), "The capital of France is"):
        want = reference.complete(prompt)
        status, got = http_json(prefill_only.url + "/v1/completions", completion(prompt))
        assert status == 200, got
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
        assert got["choices"][0]["token_ids"] == want["choices"][0]["token_ids"]
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 16,
    }
    status, got = http_json(prefill_only.url + "/v1/chat/completions", chat)
    _, want = http_json(reference.url + "/v1/chat/completions", chat)
    assert status == 200, got
    assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
    with urllib.request.urlopen(prefill_only.url + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'pdserve_dispatches_total{mode="fallback"} 3.0' in metrics


def test_priorities_reach_vllm_and_bad_ones_are_400(
    prefill_only: ServeCluster, reference: PlainVLLM
) -> None:
    """Under vLLM's priority scheduling a priority changes the order, not the greedy output."""
    prompt = "One, two, three,"
    want = reference.complete(prompt)["choices"][0]["text"]
    for body, headers in (
        (completion(prompt, priority=-3), {}),
        (completion(prompt, priority=5), {"x-priority": "-1", "x-slo-ttft-ms": "60000"}),
    ):
        status, got = http_json(prefill_only.url + "/v1/completions", body, headers)
        assert status == 200, got
        assert got["choices"][0]["text"] == want
    for headers in ({"x-priority": "urgent"}, {"x-slo-tpot-ms": "0"}):
        status, error = http_json(prefill_only.url + "/v1/completions", completion(prompt), headers)
        assert status == 400 and error["error"]["param"] == next(iter(headers)), error
