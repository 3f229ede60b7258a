"""One vLLM instance started through pdserve answers the official OpenAI client (issue 2)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from pdserve.cluster.processes import ManagedProcess, free_port, http_ok, pdserve_argv, wait_until
from tests.integration.helpers import MODEL, START_TIMEOUT_S

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = Path(tmp_path_factory.mktemp("single")) / "instance.log"
    process = ManagedProcess(
        "instance",
        pdserve_argv("instance", "--role", "both", "--port", str(port), "--kv-cache-gib", "1"),
        log,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(url + "/health"), START_TIMEOUT_S, "the instance", [process])
        yield url
    finally:
        process.stop()
        assert not process.alive()


def test_chat_completion(instance: str) -> None:
    client = openai.OpenAI(base_url=instance + "/v1", api_key="unused")
    answer = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=30,  # type: ignore[arg-type]
    )
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.usage is not None and answer.usage.completion_tokens > 0


def test_streaming_chat_completion(instance: str) -> None:
    client = openai.OpenAI(base_url=instance + "/v1", api_key="unused")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=30,
        stream=True,  # type: ignore[arg-type]
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 3, "a stream arrives in several chunks"
    assert "Paris" in "".join(pieces)
