"""Every field of vLLM's OpenAI request models is decided on by the gateway: passed through,
handled, or refused with a clear message (so a vLLM upgrade cannot slip a field past it)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from pdserve.gateway.errors import APIError
from pdserve.gateway.openai_api import GATEWAY_FIELDS, Kind, parse_request
from pdserve.gateway.vllm_fields import GATEWAY, PASSED, REFUSED, FieldUse, use_of

pytestmark = pytest.mark.unit

BODIES: dict[Kind, dict[str, Any]] = {
    "completion": {"model": "m", "prompt": "hi"},
    "chat": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
}


def vllm_fields() -> dict[Kind, set[str]]:
    chat = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")
    completion = pytest.importorskip("vllm.entrypoints.openai.completion.protocol")
    return {
        "completion": set(completion.CompletionRequest.model_fields),
        "chat": set(chat.ChatCompletionRequest.model_fields),
    }


def test_every_vllm_request_field_is_decided_on() -> None:
    for kind, names in vllm_fields().items():
        undecided = sorted(n for n in names if use_of(n) is None)
        assert not undecided, f"{kind}: fields of vLLM's request not in vllm_fields: {undecided}"


def test_the_three_uses_do_not_overlap() -> None:
    assert not (GATEWAY & PASSED) and not (set(REFUSED) & (GATEWAY | PASSED))


def test_refused_fields_get_a_400_that_says_why() -> None:
    for kind, names in vllm_fields().items():
        for name in sorted(n for n in names if use_of(n) is FieldUse.REFUSED):
            with pytest.raises(APIError) as refused:
                parse_request(kind, {**BODIES[kind], name: True})
            assert refused.value.status == 400
            assert refused.value.param == name
            assert refused.value.body()["error"]["message"] == REFUSED[name]


def test_passed_fields_reach_the_instances_unchanged() -> None:
    for kind, names in vllm_fields().items():
        for name in sorted(n for n in names if use_of(n) is FieldUse.PASSED):
            value = {"some": "value"}
            request = parse_request(kind, {**BODIES[kind], name: value})
            forwarded = request.model_dump(exclude_unset=True, exclude=set(GATEWAY_FIELDS))
            assert forwarded.get(name) == value, name


def test_every_responses_field_reaches_the_instance_unchanged() -> None:
    """``/v1/responses`` is relayed whole: every field of vLLM's ResponsesRequest but the
    refused ones arrives at the instance as sent."""
    responses = pytest.importorskip("vllm.entrypoints.openai.responses.protocol")
    from tests.unit.gateway_harness import MODEL, FakeInstance, LiveGateway

    names = set(responses.ResponsesRequest.model_fields) - set(REFUSED)
    body = {name: f"value of {name}" for name in names}
    # Read by the gateway too: the model, whether to stream, and which response goes on.
    body |= {"model": MODEL, "stream": False, "previous_response_id": None}
    instance = FakeInstance("both-0", "both")
    with LiveGateway([instance]) as live:
        answer = httpx.post(f"{live.url}/v1/responses", json=body)
    assert answer.status_code == 200, answer.text
    assert instance.received == [body]
