"""Turning a session's chunks into what the client asked for: SSE, or one JSON response.

The gateway always streams from instances (that is how it knows every token). A client that
asked for ``stream=false`` gets the chunks folded into one response here, the way OpenAI's
own client libraries fold a stream: texts concatenated, tool-call fragments joined by index,
logprobs appended.
"""

from __future__ import annotations

import json
from typing import Any

from pdserve.gateway.session import RequestSession


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def whole_usage(usage: dict[str, int]) -> dict[str, Any]:
    """``usage`` as vLLM 0.32 writes it in a non-streamed answer: its null details included
    (a streamed usage chunk leaves the nulls out, so streams take ``usage`` as it is). The
    gateway counts tokens itself; it has no cached-token or reasoning-token breakdown."""
    return {**usage, "prompt_tokens_details": None, "completion_tokens_details": None}


def _merge_logprobs(total: Any, part: Any) -> Any:
    if not part:
        return total
    if total is None:
        return json.loads(json.dumps(part))
    for key, value in part.items():
        if isinstance(value, list):
            total.setdefault(key, [])
            total[key] = (total[key] or []) + value
    return total


def _merge_tool_calls(calls: dict[int, dict[str, Any]], deltas: list[dict[str, Any]]) -> None:
    for delta in deltas:
        call = calls.setdefault(delta.get("index", 0), {"type": "function", "function": {}})
        if delta.get("id"):
            call["id"] = delta["id"]
        if delta.get("type"):
            call["type"] = delta["type"]
        function = delta.get("function") or {}
        if function.get("name"):
            call["function"]["name"] = function["name"]
        if "arguments" in function:
            call["function"]["arguments"] = call["function"].get("arguments", "") + (
                function["arguments"] or ""
            )


class Folder:
    """Accumulates chunks of one session into the non-streaming response."""

    def __init__(self, session: RequestSession) -> None:
        self.session = session
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.logprobs: Any = None
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: Any = None

    def add(self, chunk: dict[str, Any]) -> None:
        for choice in chunk.get("choices") or []:
            if self.session.kind == "chat":
                delta = choice.get("delta") or {}
                self.text.append(delta.get("content") or "")
                self.reasoning.append(
                    delta.get("reasoning_content") or delta.get("reasoning") or ""
                )
                if delta.get("tool_calls"):
                    _merge_tool_calls(self.tool_calls, delta["tool_calls"])
            else:
                self.text.append(choice.get("text") or "")
            self.logprobs = _merge_logprobs(self.logprobs, choice.get("logprobs"))
            self.token_ids.extend(choice.get("token_ids") or [])
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
                self.stop_reason = choice.get("stop_reason")

    def response(self) -> dict[str, Any]:
        session = self.session
        choice: dict[str, Any] = {
            "index": 0,
            "logprobs": self.logprobs,
            "finish_reason": self.finish_reason,
            "stop_reason": self.stop_reason,
        }
        if session.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text)}
            reasoning = "".join(self.reasoning)
            if reasoning:
                message["reasoning_content"] = reasoning
            if self.tool_calls:
                message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
            choice["message"] = message
        else:
            choice["text"] = "".join(self.text)
        body = session.envelope(streamed=False)
        body.update(choices=[choice], usage=whole_usage(session.usage()))
        session.extras.add_to(body, choice)
        if session.request.return_token_ids:
            choice["token_ids"] = self.token_ids
            if session.kind == "chat":
                body["prompt_token_ids"] = session.prompt_ids
            else:
                choice["prompt_token_ids"] = session.prompt_ids
        return body
