"""vLLM's utility endpoints at the gateway (fake instances): forwarded to an instance of the
model whatever its role, their answers and errors unchanged, reserved fields refused."""

from __future__ import annotations

import httpx
import pytest

from tests.unit.gateway_harness import MODEL, FakeInstance, LiveGateway

pytestmark = pytest.mark.unit


def test_tokenize_detokenize_and_version_are_an_instances_answers() -> None:
    prefill = FakeInstance("prefill-0", "prefill")
    with LiveGateway([prefill]) as live:
        tokens = httpx.post(f"{live.url}/tokenize", json={"model": MODEL, "prompt": "ab"})
        assert tokens.status_code == 200, tokens.text
        assert tokens.json()["tokens"] == [ord("a"), ord("b")]
        assert prefill.received[-1] == {"model": MODEL, "prompt": "ab"}
        text = httpx.post(f"{live.url}/detokenize", json={"tokens": [1, 2]})
        assert text.json() == {"prompt": "<1><2>"}
        assert httpx.get(f"{live.url}/version").json() == {"version": "fake-prefill-0"}


def test_utility_errors_are_openai_errors() -> None:
    with LiveGateway() as live:
        refused = httpx.post(f"{live.url}/tokenize", json={"model": MODEL})
        assert refused.status_code == 400
        assert refused.json()["error"]["message"] == "prompt is required"
        unknown = httpx.post(f"{live.url}/tokenize", json={"model": "other", "prompt": "a"})
        assert unknown.status_code == 404
        assert unknown.json()["error"]["param"] == "model"
        reserved = {"prompt": "a", "kv_transfer_params": {}}
        assert httpx.post(f"{live.url}/tokenize", json=reserved).status_code == 400
        assert httpx.post(f"{live.url}/tokenize", content=b"[1").status_code == 400


def test_ping_answers_like_health_without_an_api_key() -> None:
    with LiveGateway(api_key="k") as live:
        for method in ("GET", "POST"):
            ping = httpx.request(method, f"{live.url}/ping")
            health = httpx.get(f"{live.url}/health")
            assert (ping.status_code, ping.json()) == (health.status_code, health.json())
        assert httpx.get(f"{live.url}/version").status_code == 401


def test_no_instance_is_503_with_retry_after() -> None:
    with LiveGateway([]) as live:
        answer = httpx.post(f"{live.url}/tokenize", json={"prompt": "a"})
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "2"


def test_responses_stay_with_the_instance_that_made_them() -> None:
    with LiveGateway([FakeInstance("a", "both"), FakeInstance("b", "both")]) as live:
        made = httpx.post(f"{live.url}/v1/responses", json={"model": MODEL, "input": "x"})
        assert made.status_code == 200, made.text
        response_id = made.json()["id"]
        home = response_id.split("_")[1]
        fetched = httpx.get(f"{live.url}/v1/responses/{response_id}").json()
        assert fetched["from"] == home
        follow_up = {"model": MODEL, "input": "y", "previous_response_id": response_id}
        again = httpx.post(f"{live.url}/v1/responses", json=follow_up).json()
        assert again["id"].split("_")[1] == home
        streamed = httpx.post(
            f"{live.url}/v1/responses", json={"model": MODEL, "input": "z", "stream": True}
        )
        assert streamed.text.startswith("event: response.created\ndata: ")
        stream_id = streamed.text.split('"id": "')[1].split('"')[0]
        assert httpx.get(f"{live.url}/v1/responses/{stream_id}").json()["from"] in ("a", "b")
        missing = httpx.get(f"{live.url}/v1/responses/resp_nobody")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "response_id"
