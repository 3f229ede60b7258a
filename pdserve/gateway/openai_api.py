"""The OpenAI request bodies the gateway accepts, checked before any instance sees them.

Fields pdserve relies on are validated strictly (types, ranges); any other field
is passed through to vLLM, which validates it in turn. A few are refused (``vllm_fields``):
``kv_transfer_params`` would let a client point an instance at arbitrary KV sources.

Bodies must be standard JSON (RFC 8259: no ``NaN`` or ``Infinity``, numbers that fit a
double) nested at most ``MAX_JSON_DEPTH`` deep: deeper bodies would exhaust Python's recursion
limit when the gateway copies or re-encodes them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from pdserve.gateway.errors import APIError
from pdserve.gateway.vllm_fields import refuse_fields
from pdserve.scheduler.snapshot import RequestEstimate

Kind = Literal["chat", "completion"]
ENDPOINTS: dict[Kind, str] = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
# vLLM's default for /v1/completions; made explicit so a continuation knows the budget.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# Fields the gateway sets on every upstream request.
GATEWAY_FIELDS = ("stream", "stream_options", "return_token_ids", "kv_transfer_params", "n")
# Choices per request (prompts x n): each is a session of its own (``fanout``).
MAX_SEQUENCES = 128
# Nesting of request bodies (objects and arrays); tool and response-format schemas included.
MAX_JSON_DEPTH = 64
# vLLM's bounds of its ``priority`` field.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Headers of a request's service class; a priority header wins over the body's field.
PRIORITY_HEADERS = ("x-priority", "x-vllm-priority")  # the second: vLLM's own name
SLO_HEADERS = {"slo_ttft_ms": "x-slo-ttft-ms", "slo_tpot_ms": "x-slo-tpot-ms"}
MAX_SLO_MS = 86_400_000.0  # a day: anything longer is not an objective


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_SEQUENCES)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    min_tokens: int | None = Field(None, ge=0)
    return_token_ids: bool = False
    # vLLM's: lower is scheduled earlier, 0 normal (see ``Service``).
    priority: StrictInt = Field(0, ge=INT64_MIN, le=INT64_MAX)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 64:
            raise ValueError("at most 64 stop strings")
        return stop


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[Any] | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    # One prompt (text or token ids), or a batch of them: one choice per prompt and sample.
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt: Any) -> Any:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            _check_one_prompt(prompt)
            return prompt
        if not prompt:
            raise ValueError("prompt is empty")
        if len(prompt) > MAX_SEQUENCES:
            raise ValueError(f"at most {MAX_SEQUENCES} prompts per request")
        for one in prompt:
            _check_one_prompt(one)
        return prompt

    @model_validator(mode="after")
    def _sequences(self) -> CompletionRequest:
        prompts = len(self.prompt) if isinstance(self.prompt, list) else 1
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], int):
            prompts = 1
        if prompts * self.n > MAX_SEQUENCES:
            raise ValueError(f"prompts x n is at most {MAX_SEQUENCES}")
        return self

    def budget(self) -> int:
        return self.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS


def _check_one_prompt(prompt: str | list[int]) -> None:
    if not prompt:
        raise ValueError("prompt is empty")
    if isinstance(prompt, list) and any(t < 0 for t in prompt):
        raise ValueError("token ids must be non-negative")


def _message_text(message: Message) -> str:
    if isinstance(message.content, str):
        return message.content
    if isinstance(message.content, list):
        return " ".join(
            str(part.get("text", "")) for part in message.content if isinstance(part, dict)
        )
    return ""


def prompt_estimates(request: ChatRequest | CompletionRequest) -> list[int]:
    """Per prompt, the estimate the gateway falls back to where it cannot tokenize (about
    4 characters per token; ``gateway.tokens``), exact for token-id prompts."""
    if isinstance(request, CompletionRequest):
        prompt = request.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            return [_prompt_estimate(prompt)]  # type: ignore[arg-type]
        return [_prompt_estimate(one) for one in prompt]  # type: ignore[union-attr]
    chars = sum(len(_message_text(m)) for m in request.messages)
    return [math.ceil(chars / 4) + 8 * len(request.messages)]


def estimate_prompt_tokens(request: ChatRequest | CompletionRequest) -> int:
    """The estimate of all the request's prompts together."""
    return sum(prompt_estimates(request))


def known_prompt_ids(request: ChatRequest | CompletionRequest) -> tuple[int, ...] | None:
    """The prompt's token ids where the request gives them itself (a completion of one
    token-id prompt): what the prefix index matches (``RequestEstimate.prompt_token_ids``)."""
    if isinstance(request, CompletionRequest):
        prompt = request.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return tuple(prompt)  # type: ignore[arg-type]
    return None


def _prompt_estimate(prompt: str | list[int]) -> int:
    if isinstance(prompt, list):
        return len(prompt)
    return math.ceil(len(prompt) / 4) + 1


def _describe(error: ValidationError) -> tuple[str, str | None]:
    first = error.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    extra = f" (and {error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
    return f"{param}: {message}{extra}" if param else message + extra, param


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether objects and arrays nest deeper than ``limit`` (level by level: no recursion)."""
    level = [value]
    depth = 1
    while level:
        if depth > limit:
            return True
        below: list[Any] = []
        for item in level:
            children = item.values() if isinstance(item, dict) else item
            below += [c for c in children if isinstance(c, (dict, list))]
        level = below
        depth += 1
    return False


def parse_json_body(raw: bytes) -> Any:
    """The JSON value of a request body; APIError 400 if it is not standard, shallow JSON."""
    try:
        body = json.loads(raw, parse_constant=_not_json, parse_float=_finite)
    except (ValueError, RecursionError) as e:
        if isinstance(e, RecursionError):
            e = ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if isinstance(body, (dict, list)) and _depth_exceeds(body, MAX_JSON_DEPTH):
        raise APIError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
    return body


def parse_request(kind: Kind, body: Any) -> ChatRequest | CompletionRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    refuse_fields(body)
    model: type[ChatRequest | CompletionRequest] = (
        ChatRequest if kind == "chat" else CompletionRequest
    )
    try:
        request = model.model_validate(body)
    except ValidationError as e:
        message, param = _describe(e)
        raise APIError(400, message, param=param) from None
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options needs stream=true", param="stream_options")
    return request


@dataclass(frozen=True)
class Service:
    """What a request asks of the service beyond its body's sampling: priority and SLOs.

    ``vllm_priority`` keeps vLLM's convention (the ``priority`` field, and the ``x-priority``
    header, mean the same): lower is scheduled earlier, 0 is normal, negative is more
    important. It reaches every leg, where vLLM honours it on instances started with
    ``--scheduling-policy priority`` (``pdserve serve --priority-scheduling``) and ignores
    it otherwise. The policies get ``priority``, turned around (higher is more important,
    0 normal: ``RequestEstimate.priority``). The SLOs (milliseconds) are the request's own,
    None: the cluster's.
    """

    vllm_priority: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None

    @property
    def priority(self) -> int:
        return -self.vllm_priority


def estimate_of(request: ChatRequest | CompletionRequest, service: Service) -> RequestEstimate:
    """What the policies and admission control know of a request before any instance saw
    it (``budget``: 256 output tokens where the client set none)."""
    return RequestEstimate(
        estimate_prompt_tokens(request),
        request.budget() or 256,
        priority=service.priority,
        slo_ttft_ms=service.slo_ttft_ms,
        slo_tpot_ms=service.slo_tpot_ms,
        prompt_token_ids=known_prompt_ids(request),
    )


def _integer(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def _priority_header(headers: Mapping[str, str]) -> int | None:
    for name in PRIORITY_HEADERS:
        text = headers.get(name)
        if text is None:
            continue
        value = _integer(text)
        if value is None or not INT64_MIN <= value <= INT64_MAX:
            raise APIError(
                400,
                f"{name}: an integer is required (vLLM's priority: lower is scheduled "
                f"earlier, 0 normal), got {text[:40]!r}",
                param=name,
            )
        return value
    return None


def _slo_header(headers: Mapping[str, str], name: str) -> float | None:
    text = headers.get(name)
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_SLO_MS:  # NaN fails too
        raise APIError(
            400,
            f"{name}: a number of milliseconds above 0 and at most {MAX_SLO_MS:.0f} is "
            f"required, got {text[:40]!r}",
            param=name,
        )
    return value


def parse_service(headers: Mapping[str, str], request: ChatRequest | CompletionRequest) -> Service:
    """The request's priority (header, else body) and SLO headers; APIError 400 if invalid.

    ``headers``: case-insensitive (Starlette's), or a dict with lower-case names.
    """
    priority = _priority_header(headers)
    slos = {field: _slo_header(headers, name) for field, name in SLO_HEADERS.items()}
    return Service(request.priority if priority is None else priority, **slos)


# What an X-Request-Id may be: the id reaches vLLM's logs and response ids unchanged.
MAX_REQUEST_ID_CHARS = 256


def client_request_id(
    headers: Mapping[str, str], request: ChatRequest | CompletionRequest
) -> str | None:
    """The client's id for the request: the ``X-Request-Id`` header, else the body's
    ``request_id`` (vLLM's order); None when it sent neither. A 400 for an id that is not
    printable ASCII of at most ``MAX_REQUEST_ID_CHARS``."""
    given = headers.get("x-request-id")
    param = "X-Request-Id"
    if given is None:
        body_id = (request.model_extra or {}).get("request_id")
        if body_id is None:
            return None
        given, param = str(body_id), "request_id"
    if not 0 < len(given) <= MAX_REQUEST_ID_CHARS or not (given.isascii() and given.isprintable()):
        raise APIError(
            400, f"{param} must be 1-{MAX_REQUEST_ID_CHARS} printable ASCII characters", param=param
        )
    return given
