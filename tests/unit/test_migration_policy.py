"""Pieces of live migration that need no cluster: pre-copy requests, outcomes, drain plans."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from pdserve.gateway.migration import (
    MigrationFailure,
    MigrationResult,
    MigrationStatus,
    _precopy_safe,
    precopy_request,
)
from pdserve.kv.messages import SourceSpec, parse_params, tokens_digest


def session(**base_body: Any) -> Any:
    return SimpleNamespace(model="m", base_body=base_body)


def source(prompt: list[int]) -> SourceSpec:
    return SourceSpec(
        transfer_id="t",
        instance_id="decode-0",
        addresses=["tcp://127.0.0.1:1"],
        num_tokens=len(prompt),
        block_size=16,
        cache_fingerprint="x",
        tokens_digest=tokens_digest(prompt),
        keep=True,
    )


def test_precopy_carries_the_cache_salt() -> None:
    prompt = list(range(32))
    body = precopy_request(session(cache_salt="tenant-a"), prompt, source(prompt))
    assert body["cache_salt"] == "tenant-a"
    assert body["prompt"] == prompt and body["max_tokens"] == 1
    params = parse_params(body["kv_transfer_params"])
    assert params is not None and params.source is not None and params.source.keep


def test_precopy_without_a_salt_adds_none() -> None:
    prompt = list(range(16))
    assert "cache_salt" not in precopy_request(session(), prompt, source(prompt))


def test_multimodal_requests_are_not_precopied() -> None:
    text = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    image = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        ]
    }
    assert _precopy_safe(session(**text))
    assert _precopy_safe(session(messages=[{"role": "user", "content": "plain"}]))
    assert not _precopy_safe(session(**image))


def test_outcomes_serialize_as_their_codes() -> None:
    import json

    result = MigrationResult(
        "k", "a", "b", MigrationStatus.ABORTED, failure=MigrationFailure.TIMED_OUT
    )
    data = json.loads(json.dumps(result.as_json()))
    assert (data["status"], data["failure"]) == ("aborted", "timed_out")
