"""Differential test: the same requests to one plain vLLM instance and to the pdserve cluster
(1 prefill + 2 decode, every request disaggregated), compared on what a client relies on:
status class, greedy and seeded text per choice, number of choices, usage, logprob counts,
error types. A case that differs names itself and both answers.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.integration.helpers import MODEL, PlainVLLM, ServeCluster, http_json

SHORT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a colour."}]
# Prompts whose tokens the gateway counts itself (issue 14): text that does not survive a
# decode unchanged, special-token text, and a conversation with a system prompt.
UNICODE = "  Caf\u00e9 na\u00efve \u2014 \u65e5\u672c\u8a9e \U0001f600\ttabs\n\nand  spaces "
SPECIAL = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another \u00e9 one?"},
]


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: dict[str, Any] | None = None
    method: str = "POST"
    # Fields of the answer to compare beyond the defaults (a dotted path per entry).
    extra: tuple[str, ...] = field(default=())


def completion(name: str, **body: Any) -> Case:
    return Case(name, "/v1/completions", {"model": MODEL, "max_tokens": 8, **body})


def chat(name: str, **body: Any) -> Case:
    return Case(name, "/v1/chat/completions", {"model": MODEL, "max_tokens": 8, **body})


GREEDY = {"temperature": 0}
SEEDED = {"temperature": 0.9, "seed": 7}
CASES = [
    completion("greedy", prompt=SHORT, **GREEDY),
    completion("seeded", prompt=SHORT, **SEEDED),
    completion("token ids", prompt=[504, 3575, 282, 4649, 314], **GREEDY),
    completion("batched prompts", prompt=[SHORT, "One, two,"], **GREEDY),
    completion("echo", prompt=SHORT, echo=True, **GREEDY),
    completion("unicode prompt", prompt=UNICODE, **GREEDY),
    completion("echo unicode", prompt=UNICODE, echo=True, **GREEDY),
    completion("echo batched", prompt=[UNICODE, SHORT], echo=True, **GREEDY),
    completion("special-token text", prompt=SPECIAL, **GREEDY),
    completion("echo token ids", prompt=[504, 3575, 282, 4649, 314], echo=True, **GREEDY),
    completion("logprobs", prompt=SHORT, logprobs=2, **GREEDY),
    completion("prompt logprobs", prompt=SHORT, prompt_logprobs=1, **GREEDY),
    completion("n=2 seeded", prompt=SHORT, n=2, **SEEDED),
    completion("stop string", prompt="One, two, three,", stop=[" six"], max_tokens=16, **GREEDY),
    completion(
        "penalties",
        prompt=SHORT,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        repetition_penalty=1.2,
        **GREEDY,
    ),
    completion(
        "guided choice", prompt=SHORT, structured_outputs={"choice": ["Paris", "Rome"]}, **GREEDY
    ),
    completion(
        "stream", prompt=SHORT, stream=True, stream_options={"include_usage": True}, **GREEDY
    ),
    completion("stream n=2", prompt=SHORT, stream=True, n=2, **SEEDED),
    completion("error: max_tokens", prompt=SHORT, max_tokens=-1),
    completion("error: temperature", prompt=SHORT, temperature=-1),
    completion("error: too long", prompt=[1] * 9000, **GREEDY),
    completion("error: suffix", prompt=SHORT, suffix="x"),
    Case("error: unknown model", "/v1/completions", {"model": "nope", "prompt": SHORT}),
    chat("chat greedy", messages=CHAT, **GREEDY),
    chat("chat seeded", messages=CHAT, **SEEDED),
    chat("chat n=2 seeded", messages=CHAT, n=2, **SEEDED),
    chat("chat logprobs", messages=CHAT, logprobs=True, top_logprobs=2, **GREEDY),
    chat("chat json mode", messages=CHAT, response_format={"type": "json_object"}, **GREEDY),
    chat(
        "chat stream",
        messages=CHAT,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    ),
    chat("chat error: messages", messages=[]),
    chat("chat conversation", messages=CONVERSATION, **GREEDY),
    chat(
        "chat continue final message",
        messages=[*CHAT, {"role": "assistant", "content": "The colour is"}],
        add_generation_prompt=False,
        continue_final_message=True,
        **GREEDY,
    ),
    chat(
        "chat stream conversation",
        messages=CONVERSATION,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    ),
    Case("tokenize", "/tokenize", {"model": MODEL, "prompt": SHORT}, extra=("tokens", "count")),
    Case("tokenize chat", "/tokenize", {"model": MODEL, "messages": CHAT}, extra=("tokens",)),
    Case("detokenize", "/detokenize", {"model": MODEL, "tokens": [504, 3575]}, extra=("prompt",)),
    Case("version", "/version", method="GET", extra=("version",)),
    Case("models", "/v1/models", method="GET", extra=("object",)),
    Case(
        "responses",
        "/v1/responses",
        {"model": MODEL, "input": SHORT, "max_output_tokens": 8, **GREEDY},
    ),
    Case(
        "responses stream",
        "/v1/responses",
        {"model": MODEL, "input": SHORT, "stream": True, "max_output_tokens": 8, **GREEDY},
    ),
    chat(
        "chat tools, tool_choice none",
        messages=CHAT,
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "colour",
                    "description": "Names a colour.",
                    "parameters": {"type": "object", "properties": {}},
                },
            }
        ],
        tool_choice="none",
        **GREEDY,
    ),
    Case(
        "request id",
        "/v1/completions",
        {"model": MODEL, "prompt": SHORT, "max_tokens": 4, "request_id": "parity-1", **GREEDY},
        extra=("id",),
    ),
]


def _send(base: str, case: Case) -> tuple[int, Any]:
    if case.method == "GET":
        return http_json(base + case.path)
    if not (case.body or {}).get("stream"):
        return http_json(base + case.path, case.body)
    request = urllib.request.Request(
        base + case.path,
        data=json.dumps(case.body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            events = [
                json.loads(line[6:])
                for line in response.read().decode().splitlines()
                if line.startswith("data: ") and line != "data: [DONE]"
            ]
            return response.status, events
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _choice_text(choice: dict[str, Any]) -> str:
    if "text" in choice:
        return str(choice["text"])
    message = choice.get("message") or choice.get("delta") or {}
    return str(message.get("content") or "")


def _logprob_count(choice: dict[str, Any]) -> int | None:
    logprobs = choice.get("logprobs")
    if not logprobs:
        return None
    if "tokens" in logprobs:
        return len(logprobs["tokens"])
    return len(logprobs.get("content") or [])


def _responses_output(response: dict[str, Any]) -> list[Any]:
    return [
        part.get("text")
        for item in response.get("output", [])
        for part in item.get("content") or []
    ]


def _dig(answer: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        answer = answer.get(part) if isinstance(answer, dict) else None
    return answer


def summary(case: Case, status: int, answer: Any) -> dict[str, Any]:
    """What must agree between plain vLLM and pdserve for one answer."""
    out: dict[str, Any] = {"status": status // 100}
    if status >= 400:
        error = answer.get("error", {}) if isinstance(answer, dict) else {}
        out["error_type"] = error.get("type") if isinstance(error, dict) else None
        return out
    if isinstance(answer, list) and any("type" in e for e in answer):  # a Responses stream
        out["events"] = [e.get("type") for e in answer]
        done = next((e for e in answer if e.get("type") == "response.completed"), {})
        out["output"] = _responses_output(done.get("response") or {})
        return out
    if isinstance(answer, list):  # a stream: the choices' text joined per index
        texts: dict[int, str] = {}
        for event in answer:
            for choice in event.get("choices") or []:
                texts[choice["index"]] = texts.get(choice["index"], "") + _choice_text(choice)
        out["texts"] = texts
        out["usage"] = next((e["usage"] for e in answer if e.get("usage")), None)
        return out
    for name in case.extra:
        out[name] = _dig(answer, name)
    if case.path == "/v1/responses":
        out["output"] = _responses_output(answer)
        out["usage"] = answer.get("usage", {}).get("output_tokens")
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if choices is not None:
        out["choices"] = [
            {
                "index": c.get("index"),
                "text": _choice_text(c),
                "finish_reason": c.get("finish_reason"),
                "logprobs": _logprob_count(c),
                "prompt_logprobs": len(c["prompt_logprobs"]) if c.get("prompt_logprobs") else None,
            }
            for c in choices
        ]
        # The whole object, its keys included (vLLM sends null details).
        out["usage"] = answer.get("usage")
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pdserve_answers_as_plain_vllm(
    case: Case, reference: PlainVLLM, cluster: ServeCluster
) -> None:
    want = summary(case, *_send(reference.url, case))
    got = summary(case, *_send(cluster.url, case))
    assert got == want, f"{case.name}: pdserve {got} vs plain vLLM {want}"
