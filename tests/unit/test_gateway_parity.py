"""vLLM parity at the gateway with fake instances: n > 1 and batched prompts as one answer,
the client's X-Request-Id end to end, echo of the prompt."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.unit.gateway_harness import FakeInstance, LiveGateway

pytestmark = pytest.mark.unit


def test_n_and_batched_prompts_make_one_answer_in_vllms_choice_order() -> None:
    with LiveGateway() as live:
        body = {"prompt": ["ab", "c"], "n": 2, "max_tokens": 3, "seed": 5}
        answer = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30).json()
        assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
        assert answer["usage"]["completion_tokens"] == 4 * 3
        sent = [b for i in live.instances for b in i.received if b.get("stream")]
        seeds = sorted(b.get("seed") for b in sent)
        assert seeds == [5, 5, 6, 6]  # sample j gets seed + j, as vLLM's children
        assert all(b.get("n", 1) == 1 for b in sent)


def test_the_clients_request_id_names_the_answer_and_every_leg() -> None:
    with LiveGateway() as live:
        body = {"prompt": "hello there", "max_tokens": 2}
        answer = httpx.post(
            f"{live.url}/v1/completions", json=body, headers={"X-Request-Id": "abc-1"}
        )
        assert answer.headers["x-request-id"] == "abc-1"
        assert answer.json()["id"] == "cmpl-abc-1"
        assert {i.headers[-1] for i in live.instances if i.headers} == {"abc-1"}
        bad = httpx.post(f"{live.url}/v1/completions", json=body, headers={"X-Request-Id": ""})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Id"


def test_echo_puts_the_prompt_before_the_completion() -> None:
    with LiveGateway() as live:
        body = {"prompt": "hello", "max_tokens": 2, "echo": True}
        answer = httpx.post(f"{live.url}/v1/completions", json=body).json()
        assert answer["choices"][0]["text"].startswith("hello")
        sent = [b for i in live.instances for b in i.received]
        assert all("echo" not in b for b in sent)


def test_every_sample_of_n_fails_over_when_its_instance_dies() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from pdserve.protocol.reports import Deregister
    from tests.unit.test_gateway_kv_faults import completion, on_loop, post, wait_until

    dying = FakeInstance("decode-0", "decode", free_blocks=1000)
    dying.pause_after_first = asyncio.Event()
    survivor = FakeInstance("decode-1", "decode", free_blocks=900)
    with LiveGateway([dying, survivor]) as gateway, ThreadPoolExecutor(1) as pool:
        sessions = gateway.app.state.sessions
        request = pool.submit(post, gateway, completion(list(range(1, 41)), stream=True, n=2))
        # The second sample follows the first onto its instance (one prefill per prompt).
        wait_until(
            lambda: (
                len(sessions.on("decode-0")) == 2
                and all(s.output_ids for s in sessions.on("decode-0"))
            ),
            what="both samples' first tokens on decode-0",
        )
        on_loop(gateway, lambda: gateway.ctx.control.handle(Deregister(instance_id="decode-0")))
        response = request.result(timeout=30)
    assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]")
    finished = [line for line in response.text.splitlines() if '"finish_reason":"length"' in line]
    assert sorted(json.loads(line[6:])["choices"][0]["index"] for line in finished) == [0, 1]
    assert len([b for b in survivor.received if b.get("stream")]) == 2  # both continued there


def test_usage_has_vllms_null_details_when_not_streamed_and_leaves_them_out_of_streams() -> None:
    details = {"prompt_tokens_details": None, "completion_tokens_details": None}
    with LiveGateway() as live:
        for body in ({"prompt": "ab", "max_tokens": 2}, {"prompt": ["ab", "c"], "max_tokens": 2}):
            usage = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30).json()["usage"]
            assert usage.items() >= details.items() and usage["total_tokens"] > 0
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        lines = httpx.post(f"{live.url}/v1/completions", json=stream, timeout=30).text.split("\n")
        events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        streamed = next(e["usage"] for e in events if e.get("usage"))
        assert not details.keys() & streamed.keys()
