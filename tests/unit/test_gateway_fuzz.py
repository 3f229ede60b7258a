"""Fuzzing the live gateway: no input a client sends may produce a 5xx, a crash or a hang.

Two fuzzers, both against a real gateway (uvicorn, middlewares, control plane) in front of
fake instances that answer like vLLM (``gateway_harness``):

- schemathesis over the gateway's own ``/openapi.json``, for every route, in positive and
  negative mode. The completion routes read their bodies by hand, so their OpenAPI entries
  carry no body schema; the test adds the JSON schemas of the very models the gateway
  validates with (``ChatRequest``, ``CompletionRequest``) before generating;
- hypothesis: raw bodies, valid ones with fields replaced by junk of every JSON type, deep
  nesting, huge numbers, non-finite numbers, invalid UTF-8.

Every answer must be below 500 (instances are joined and healthy, so not even 503) and, when
it is an error, in OpenAI's format with the HTTP status as its code. Deterministic
(``derandomize``) and bounded; about 20 s on a small machine.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from pdserve.gateway.app import create_app
from pdserve.gateway.openai_api import ChatRequest, CompletionRequest
from pdserve.gateway.settings import GatewaySettings
from pdserve.scheduler.dispatch import DispatchSettings
from tests.unit.gateway_harness import MODEL, SECRET, LiveGateway

REQUEST_TIMEOUT_S = 10.0
MAX_STREAM_EVENTS = 10_000


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def gateway() -> Iterator[LiveGateway]:
    with LiveGateway() as live:
        yield live


@pytest.fixture(scope="module")
def client(gateway: LiveGateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=REQUEST_TIMEOUT_S) as c:
        yield c


def check_answer(status: int, content_type: str, content: bytes, what: str) -> None:
    """Below 500; an error is in OpenAI's format; a stream ends with [DONE]."""
    assert status < 500, f"{what}: {status} {content[:500]!r}"
    if status >= 400:
        body = json.loads(content)
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"], what
        assert isinstance(error["type"], str), what
        assert error["code"] == status, what
    elif status == 200 and content_type.startswith("text/event-stream"):
        assert content.rstrip().endswith(b"data: [DONE]"), f"{what}: {content[-300:]!r}"


# --- schemathesis over /openapi.json --------------------------------------------------------


def _body_schema(model: type[Any], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    # Served model, or none: other names only in negative mode (a plain 404 otherwise).
    schema["properties"]["model"] = {"anyOf": [{"enum": [MODEL]}, {"type": "null"}]}
    return schema


def openapi_with_bodies(raw: dict[str, Any]) -> dict[str, Any]:
    """The gateway's schema, with the request bodies its handlers validate by hand."""
    raw = copy.deepcopy(raw)
    components = raw.setdefault("components", {}).setdefault("schemas", {})
    bodies = {
        "/v1/chat/completions": _body_schema(ChatRequest, components),
        "/v1/completions": _body_schema(CompletionRequest, components),
        "/admin/migrate": {
            "type": "object",
            "properties": {"request_key": {"type": "string"}, "target": {"type": "string"}},
            "required": ["request_key", "target"],
        },
    }
    for path, schema in bodies.items():
        raw["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    return raw


def _operations() -> list[Any]:
    """Every route; negative mode where there is a body (any string is a valid path id)."""
    # Built from an app object, without serving it, so pytest can list the cases.
    raw = openapi_with_bodies(create_app(GatewaySettings(), DispatchSettings(), SECRET).openapi())
    cases = []
    for path, methods in raw["paths"].items():
        for method, spec in methods.items():
            modes = [GenerationMode.POSITIVE]
            if "requestBody" in spec:
                modes.append(GenerationMode.NEGATIVE)
            for mode in modes:
                name = f"{method.upper()} {path} {mode.value}"
                cases.append(pytest.param(path, method.upper(), mode, id=name))
    return cases


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("path", "method", "mode"), _operations())
def test_schemathesis_finds_no_server_error(
    gateway: LiveGateway, client: httpx.Client, path: str, method: str, mode: GenerationMode
) -> None:
    raw = client.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(openapi_with_bodies(raw))
    # Read whole streams (schemathesis stops at 20 events): an answer of n choices or
    # batched prompts has a few events per choice, and the check wants its [DONE].
    schema.config.max_stream_events = MAX_STREAM_EVENTS
    operation = schema[path][method]
    examples = 40 if mode == GenerationMode.NEGATIVE or path.startswith("/v1/") else 10

    @fuzz_settings(examples)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call(base_url=gateway.url, timeout=REQUEST_TIMEOUT_S)
        content_type = (response.headers.get("content-type") or [""])[0]
        check_answer(
            response.status_code,
            content_type,
            response.content,
            f"{method} {path} {case.body!r:.300}",
        )

    run()
    health = client.get("/health")
    assert health.status_code == 200, "the fuzz left the cluster unusable"


# --- hypothesis: junk bodies -------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["", "\x00", "\ud7ff\ue000", "😀" * 10, "user", "assistant", MODEL])
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
CHAT_FIELDS = ["messages", "model", "stream", "stream_options", "max_tokens", "temperature",
               "top_p", "n", "stop", "seed", "min_tokens", "return_token_ids", "logprobs",
               "top_logprobs", "max_completion_tokens", "tools", "response_format", "top_k"]  # fmt: skip
COMPLETION_FIELDS = ["prompt", "model", "stream", "stream_options", "max_tokens", "echo",
                     "temperature", "stop", "seed", "min_tokens", "logprobs", "top_k",
                     "return_token_ids", "ignore_eos"]  # fmt: skip


def _valid(kind: str, stream: bool) -> dict[str, Any]:
    if kind == "chat":
        return {"messages": [{"role": "user", "content": "hello"}], "stream": stream}
    return {"prompt": "hello", "stream": stream}


@st.composite
def mutated_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid request with some fields set to junk (and sometimes junk in a message)."""
    kind = draw(st.sampled_from(["chat", "completion"]))
    body: dict[str, Any] = _valid(kind, draw(st.booleans()))
    fields = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    for name in draw(st.lists(st.sampled_from(fields), max_size=4, unique=True)):
        body[name] = draw(JSON_VALUES)
    if kind == "chat" and draw(st.booleans()) and isinstance(body.get("messages"), list):
        body["messages"] = [*body["messages"], draw(JSON_VALUES)]
    if draw(st.booleans()):
        body[draw(st.text(max_size=12))] = draw(JSON_VALUES)
    return kind, json.dumps(body).encode()


def _path(kind: str) -> str:
    return "/v1/chat/completions" if kind == "chat" else "/v1/completions"


def _deep(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


def _with(kind: str, field: str, raw_value: str) -> bytes:
    """A valid body plus one field written verbatim (which ``json.dumps`` could not write)."""
    return f"{json.dumps(_valid(kind, False))[:-1]}, {json.dumps(field)}: {raw_value}}}".encode()


@pytest.mark.timeout(120)
@fuzz_settings(150)
@given(request=mutated_bodies())
@example(request=("chat", _deep(100_000).encode()))
@example(request=("chat", _with("chat", "x", _deep(900))))
@example(request=("chat", _with("chat", "tools", '{"a":' * 500 + "1" + "}" * 500)))
@example(request=("completion", _with("completion", "user", _deep(300))))
@example(request=("chat", f'{{"messages":[{{"role":"user","content":{_deep(400)}}}]}}'.encode()))
@example(request=("chat", _with("chat", "temperature", "NaN")))
@example(request=("chat", _with("chat", "top_k", "Infinity")))
@example(request=("completion", _with("completion", "x", "-Infinity")))
@example(request=("chat", _with("chat", "max_tokens", "1e400")))
@example(request=("completion", b'{"prompt":[1,2,' + b"9" * 5000 + b"]}"))
@example(request=("completion", b'{"prompt":[99999999999999999999999]}'))
@example(request=("completion", b'{"prompt":"x","seed":18446744073709551615}'))
@example(request=("completion", b'{"prompt":"\xff\xfe"}'))
@example(request=("completion", b"\xef\xbb\xbf{}"))
@example(request=("chat", b""))
@example(request=("chat", b"null"))
@example(request=("chat", b'{"messages":[{"role":"user","content":[{"type":"text"}, 7, null]}]}'))
@example(request=("chat", b'{"messages":[{"role":"user"}],"stop":["a","b"],"stream":true}'))
@example(request=("completion", b'{"prompt":"x","stream":true,"stream_options":{}}'))
def test_junk_bodies_never_cause_a_server_error(
    client: httpx.Client, request: tuple[str, bytes]
) -> None:
    kind, content = request
    response = client.post(
        _path(kind), content=content, headers={"Content-Type": "application/json"}
    )
    check_answer(
        response.status_code,
        response.headers.get("content-type", ""),
        response.content,
        repr(content[:300]),
    )
