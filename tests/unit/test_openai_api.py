"""What the gateway accepts, and the clear errors for what it does not."""

from __future__ import annotations

import pytest

from pdserve.gateway.errors import APIError
from pdserve.gateway.openai_api import (
    MAX_JSON_DEPTH,
    ChatRequest,
    CompletionRequest,
    estimate_prompt_tokens,
    parse_json_body,
    parse_request,
)


def error_of(kind: str, body: object) -> APIError:
    with pytest.raises(APIError) as info:
        parse_request(kind, body)  # type: ignore[arg-type]
    return info.value


def test_valid_requests_keep_unknown_fields() -> None:
    request = parse_request(
        "chat",
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2},
    )
    assert isinstance(request, ChatRequest)
    assert request.model_dump(exclude_unset=True)["top_logprobs"] == 2


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("chat", [], None),
        ("chat", {"messages": []}, "messages"),
        ("chat", {"messages": [{"content": "no role"}]}, "messages.0.role"),
        ("completion", {"prompt": ""}, "prompt"),
        ("completion", {"prompt": ["a", ""]}, "prompt"),
        ("completion", {"prompt": ["a"] * 129}, "prompt"),
        ("completion", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("completion", {"prompt": "x", "top_p": 0}, "top_p"),
        ("completion", {"prompt": "x", "n": 0}, "n"),
        ("completion", {"prompt": ["x", "y"], "n": 65}, None),
        (
            "completion",
            {"prompt": "x", "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        (
            "completion",
            {"prompt": "x", "kv_transfer_params": {"pdserve": {}}},
            "kv_transfer_params",
        ),
        ("completion", {"prompt": "x", "stop": ["s"] * 100}, "stop"),
    ],
)
def test_bad_requests_are_400_with_the_parameter(
    kind: str, body: object, param: str | None
) -> None:
    error = error_of(kind, body)
    assert error.status == 400
    assert error.param == param
    assert error.body()["error"]["code"] == 400


def test_single_string_prompt_list_is_accepted() -> None:
    request = parse_request("completion", {"prompt": ["only one"]})
    assert isinstance(request, CompletionRequest)


def test_estimates() -> None:
    assert estimate_prompt_tokens(CompletionRequest(prompt=[1, 2, 3])) == 3
    assert 20 <= estimate_prompt_tokens(CompletionRequest(prompt="x" * 100)) <= 30
    chat = ChatRequest(messages=[{"role": "user", "content": "y" * 400}])  # type: ignore[list-item]
    assert 100 <= estimate_prompt_tokens(chat) <= 120


def test_budgets() -> None:
    assert CompletionRequest(prompt="x").budget() == 16
    assert ChatRequest(messages=[{"role": "user", "content": "x"}]).budget() is None  # type: ignore[list-item]
    assert (
        ChatRequest(
            messages=[{"role": "user", "content": "x"}],  # type: ignore[list-item]
            max_completion_tokens=5,
            max_tokens=9,
        ).budget()
        == 5
    )


def nested(depth: int) -> bytes:
    """An object ``depth`` levels deep (the top-level object counts as one)."""
    return b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_json_bodies_nested_up_to_the_limit_are_accepted() -> None:
    assert parse_json_body(b'{"prompt": "x", "temperature": 0.5}')["temperature"] == 0.5
    body = parse_json_body(nested(MAX_JSON_DEPTH))
    assert isinstance(body, dict)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (nested(MAX_JSON_DEPTH + 1), "nested deeper"),
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),  # beyond Python's recursion limit
        (b'{"temperature": NaN}', "NaN"),
        (b'{"temperature": Infinity}', "Infinity"),
        (b'{"temperature": -Infinity}', "Infinity"),
        (b'{"temperature": 1e400}', "out of range"),
        (b'{"seed": 1' + b"0" * 5000 + b"}", "not valid JSON"),
        (b'{"prompt": "\xff"}', "not valid JSON"),  # not UTF-8
        (b"", "not valid JSON"),
        (b'{"prompt": "x"', "not valid JSON"),
    ],
)
def test_non_standard_or_too_deep_json_is_400(raw: bytes, why: str) -> None:
    with pytest.raises(APIError) as info:
        parse_json_body(raw)
    assert info.value.status == 400
    assert why in info.value.message
