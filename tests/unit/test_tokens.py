"""The gateway's prompt tokens against vLLM's own: the bundled model's real tokenizer and chat
template at the gateway (``gateway.tokens``), compared with what vLLM 0.32's OpenAI
renderer (``OnlineRenderer``, the code its chat and completion endpoints call) makes of the
same request bodies, without an engine. Also the 400 of a too-long prompt, word for word,
the fallbacks, the verification against instances, and that tokenizing runs off the loop.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from pathlib import Path
from typing import Any

import pytest

from pdserve import bundled_model
from pdserve.gateway import tokens
from pdserve.gateway.chat_render import content_format
from pdserve.gateway.openai_api import Kind, parse_request
from pdserve.gateway.tokens import (
    Agreement,
    Counted,
    Counting,
    Fallback,
    LoadedTokenizer,
    Tokenizers,
    context_error,
    load_tokenizer,
)

pytestmark = pytest.mark.unit

MAX_LEN = 256
MODEL_DIR = bundled_model.model_dir()


@pytest.fixture(scope="module")
def loaded() -> LoadedTokenizer:
    if not (MODEL_DIR / "tokenizer.json").is_file():
        pytest.skip("the bundled model is not prepared (pdserve model prepare)")
    return load_tokenizer(str(MODEL_DIR))


@pytest.fixture(scope="module")
def vllm(loaded: LoadedTokenizer) -> Any:
    """vLLM's renderer of the bundled model (its config and tokenizer only: no engine)."""
    from vllm.config import ModelConfig, VllmConfig
    from vllm.renderers.registry import renderer_from_config

    config = ModelConfig(model=str(MODEL_DIR), tokenizer=str(MODEL_DIR), max_model_len=MAX_LEN)
    return config, renderer_from_config(VllmConfig(model_config=config))


def _online(vllm: Any, template: str | None = None) -> Any:
    from vllm.renderers.online_renderer import OnlineRenderer

    config, renderer = vllm
    return OnlineRenderer(
        config,
        renderer,
        request_logger=None,
        chat_template=template,
        chat_template_content_format="auto",
    )


def vllm_ids(vllm: Any, kind: Kind, body: dict[str, Any], template: str | None = None) -> Any:
    """The prompt token ids vLLM's endpoint would hand its engine (or its error)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    online = _online(vllm, template)

    async def render() -> Any:
        if kind == "chat":
            _, inputs = await online.render_chat(ChatCompletionRequest(model="m", **body))
        else:
            inputs = await online.render_completion(CompletionRequest(model="m", **body))
        return [list(i["prompt_token_ids"]) for i in inputs]

    try:
        return asyncio.run(render())
    except Exception as e:
        return str(e)


def gateway_ids(loaded: LoadedTokenizer, kind: Kind, body: dict[str, Any]) -> list[list[int]]:
    request = parse_request(kind, body)
    prompts, _ = tokens.tokenize(loaded, kind, request.model_dump(exclude_unset=True), MAX_LEN)
    return [list(p.ids or ()) for p in prompts]


COMPLETIONS = [
    {"prompt": "The capital of France is"},
    {"prompt": "  leading and trailing spaces  "},
    {"prompt": "naïve café, 東京, 🚀 and tabs\tand\n\nnewlines"},
    {"prompt": "<|im_start|>user\nspecial tokens as text<|im_end|>"},
    {"prompt": "no special tokens", "add_special_tokens": False},
    {"prompt": "special tokens", "add_special_tokens": True},
    {"prompt": ["one prompt", "and another, longer one"]},
]

USER = {"role": "user", "content": "Name a colour."}
CHATS = [
    {"messages": [USER]},
    {"messages": [{"role": "system", "content": "Be brief."}, USER]},
    {
        "messages": [
            USER,
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"},
        ]
    },
    {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ]
    },
    {"messages": [USER, {"role": "assistant", "content": None}, USER]},
    {"messages": [USER], "add_generation_prompt": False},
    {
        "messages": [USER, {"role": "assistant", "content": "The colour is"}],
        "add_generation_prompt": False,
        "continue_final_message": True,
    },
    {"messages": [USER], "chat_template_kwargs": {"unused_variable": 1}},
    {"messages": [{**USER, "name": "ann"}]},
    {"messages": [USER, {"role": "tool", "content": "42", "tool_call_id": "call-1"}]},
    {"messages": [USER], "add_special_tokens": True},
    {"messages": [USER], "reasoning_effort": "low"},
    {"messages": [USER], "documents": [{"title": "t", "text": "x"}]},
]


@pytest.mark.parametrize("body", COMPLETIONS, ids=lambda b: str(b["prompt"])[:24])
def test_completion_ids_are_vllms(loaded: LoadedTokenizer, vllm: Any, body: dict[str, Any]) -> None:
    assert gateway_ids(loaded, "completion", body) == vllm_ids(vllm, "completion", body)


@pytest.mark.parametrize("body", CHATS, ids=lambda b: str(b)[:40])
def test_chat_ids_are_vllms(loaded: LoadedTokenizer, vllm: Any, body: dict[str, Any]) -> None:
    assert gateway_ids(loaded, "chat", body) == vllm_ids(vllm, "chat", body)


# Templates that iterate over content parts: vLLM then hands the template a list of parts;
# the gateway renders both ways and uses the text where they agree.
PARTS_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
LIST_ONLY_TEMPLATE = (
    "{% for m in messages %}[{% for p in m['content'] %}{{ p['text'] }}|{% endfor %}]{% endfor %}"
)


def test_a_template_over_content_parts_counts_as_vllm_or_not_at_all(
    loaded: LoadedTokenizer, vllm: Any
) -> None:
    assert content_format(loaded.tokenizer.chat_template) == "string"
    assert content_format(PARTS_TEMPLATE) is None
    body = {"messages": [USER, {"role": "assistant", "content": "Blue."}, USER]}
    for template in (PARTS_TEMPLATE, LIST_ONLY_TEMPLATE):
        tokenizer = copy.copy(loaded.tokenizer)
        tokenizer.chat_template = template
        own = LoadedTokenizer(loaded.source, tokenizer, loaded.max_chars_per_token)
        request = parse_request("chat", body).model_dump(exclude_unset=True)
        try:
            prompts, _ = tokens.tokenize(own, "chat", request, MAX_LEN)
        except tokens.Unsupported:
            assert template is LIST_ONLY_TEMPLATE  # a string and a list render differently
            continue
        assert [list(prompts[0].ids or ())] == vllm_ids(vllm, "chat", body, template)


def _counted(loaded: LoadedTokenizer, kind: Kind, body: dict[str, Any]) -> Counted:
    """A count the gateway trusts (its tokenizer verified for the kind)."""
    service = Tokenizers("auto", 1)
    service.agreements[(loaded.source, kind)] = Agreement.MATCH
    try:
        return asyncio.run(service.count(kind, parse_request(kind, body), loaded.source, MAX_LEN))
    finally:
        service.close()


TOO_LONG = [
    ("completion", {"prompt": "word " * 300}),  # tokens: "at least 257"
    ("completion", {"prompt": "x" * (MAX_LEN * 81 + 10)}),  # characters, before tokenizing
    ("completion", {"prompt": [7] * 300}),  # token ids: their exact count
    ("completion", {"prompt": ["short", "word " * 300]}),  # the first prompt too long
    ("chat", {"messages": [{"role": "user", "content": "word " * 300}]}),
]


@pytest.mark.parametrize(("kind", "body"), TOO_LONG, ids=lambda v: str(v)[:30])
def test_a_prompt_over_the_context_gets_vllms_400(
    loaded: LoadedTokenizer, vllm: Any, kind: Kind, body: dict[str, Any]
) -> None:
    error = context_error(_counted(loaded, kind, body))
    assert error is not None and error.status == 400
    assert error.message == vllm_ids(vllm, kind, body)
    assert error.body()["error"]["type"] == "BadRequestError"


def test_a_prompt_within_the_context_passes(loaded: LoadedTokenizer) -> None:
    counted = _counted(loaded, "completion", {"prompt": "word " * 100})
    assert counted.trusted and counted.send_ids
    assert context_error(counted) is None


def _count(service: Tokenizers, kind: Kind, body: dict[str, Any], source: str | None) -> Counted:
    return asyncio.run(service.count(kind, parse_request(kind, body), source, MAX_LEN))


@pytest.mark.parametrize(
    ("body", "setting", "source", "fallback"),
    [
        ({"messages": [USER]}, "none", str(MODEL_DIR), Fallback.DISABLED),
        ({"messages": [USER]}, "auto", None, Fallback.NO_TOKENIZER),
        ({"messages": [USER]}, "auto", "/nonexistent/model/dir", Fallback.NO_TOKENIZER),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "auto",
            str(MODEL_DIR),
            Fallback.UNSUPPORTED,
        ),
        (
            {"messages": [{"role": "developer", "content": "x"}, USER]},
            "auto",
            str(MODEL_DIR),
            Fallback.UNSUPPORTED,
        ),
        (
            {
                "messages": [
                    USER,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{}"},
                            }
                        ],
                    },
                ]
            },
            "auto",
            str(MODEL_DIR),
            Fallback.UNSUPPORTED,
        ),
        (
            {"messages": [USER], "chat_template": "{{ 'x' }}"},
            "auto",
            str(MODEL_DIR),
            Fallback.UNSUPPORTED,
        ),
    ],
    ids=["disabled", "no tokenizer", "remote path", "image", "developer", "tool calls", "template"],
)
def test_what_the_gateway_cannot_tokenize_is_estimated(
    loaded: LoadedTokenizer,
    body: dict[str, Any],
    setting: str,
    source: str | None,
    fallback: Fallback,
) -> None:
    service = Tokenizers(setting, 1)
    try:
        counted = _count(service, "chat", body, source)
    finally:
        service.close()
    assert counted.method is Counting.ESTIMATED and counted.fallback is fallback
    assert not counted.trusted and counted.total > 0


def test_an_instances_custom_chat_template_leaves_chat_estimated(loaded: LoadedTokenizer) -> None:
    service = Tokenizers("auto", 1)
    try:
        request = parse_request("chat", {"messages": [USER]})
        chat = asyncio.run(service.count("chat", request, loaded.source, MAX_LEN, False))
        text = _count(service, "completion", {"prompt": "hi"}, loaded.source)
    finally:
        service.close()
    assert chat.fallback is Fallback.UNSUPPORTED
    assert text.method is Counting.TOKENIZED


def test_the_first_requests_verify_the_tokenizer_against_the_instances(
    loaded: LoadedTokenizer,
) -> None:
    checks: list[tuple[Kind, Agreement]] = []
    service = Tokenizers("auto", 1, lambda kind, agreement: checks.append((kind, agreement)))
    body = {"prompt": "The capital of France is"}
    try:
        first = _count(service, "completion", body, loaded.source)
        assert first.method is Counting.TOKENIZED and not first.trusted and not first.send_ids
        first.confirm(list(first.ids() or ()))  # what the instance reported
        second = _count(service, "completion", body, loaded.source)
        assert second.trusted and second.send_ids and second.verifier is None
        chat = _count(service, "chat", {"messages": [USER]}, loaded.source)
        assert not chat.trusted  # chat is verified on its own
        chat.confirm([1, 2, 3])  # the instance rendered it differently
        after = _count(service, "chat", {"messages": [USER]}, loaded.source)
    finally:
        service.close()
    assert after.method is Counting.ESTIMATED and after.fallback is Fallback.MISMATCH
    assert checks == [("completion", Agreement.MATCH), ("chat", Agreement.MISMATCH)]


def test_requests_whose_text_matters_are_counted_but_never_sent_as_ids(
    loaded: LoadedTokenizer,
) -> None:
    service = Tokenizers("auto", 1)
    service.agreements[(loaded.source, "chat")] = Agreement.MATCH
    service.agreements[(loaded.source, "completion")] = Agreement.MATCH
    try:
        echo = _count(service, "chat", {"messages": [USER], "echo": True}, loaded.source)
        suffix = _count(service, "completion", {"prompt": "a b c", "suffix": "x"}, loaded.source)
        cut = _count(
            service,
            "completion",
            {"prompt": "word " * 50, "truncate_prompt_tokens": 10},
            loaded.source,
        )
    finally:
        service.close()
    assert echo.method is Counting.TOKENIZED and not echo.send_ids
    assert not suffix.send_ids
    assert cut.total == 10 and not cut.send_ids


def test_token_id_prompts_are_their_own_count() -> None:
    service = Tokenizers("none", 1)
    try:
        counted = _count(service, "completion", {"prompt": [[1, 2, 3], [4, 5]]}, None)
    finally:
        service.close()
    assert counted.method is Counting.TOKEN_IDS and counted.trusted and not counted.send_ids
    assert [p.tokens for p in counted.prompts] == [3, 2] and counted.one(1).ids() == (4, 5)


def test_tokenizing_runs_in_the_worker_threads(
    loaded: LoadedTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    real = tokens.tokenize

    def recording(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(tokens, "tokenize", recording)
    service = Tokenizers(loaded.source, 2)  # a --prompt-tokenizer for every model

    async def both() -> list[Counted]:
        loop_thread = threading.current_thread().name
        counted = await asyncio.gather(
            *(
                service.count(
                    "completion", parse_request("completion", {"prompt": f"p {i}"}), None, MAX_LEN
                )
                for i in range(4)
            )
        )
        assert loop_thread not in threads
        return list(counted)

    try:
        counted = asyncio.run(both())
    finally:
        service.close()
    assert all(c.method is Counting.TOKENIZED for c in counted)
    assert len(threads) == 4 and all(t.startswith("pdserve-tokenize") for t in threads)


def test_a_tokenizer_is_loaded_once_for_concurrent_requests(
    loaded: LoadedTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []
    monkeypatch.setattr(tokens, "load_tokenizer", lambda source: loads.append(source) or loaded)
    service = Tokenizers("auto", 2)

    async def many() -> None:
        request = parse_request("completion", {"prompt": "hi"})
        await asyncio.gather(
            *(service.count("completion", request, "/some/dir", 0) for _ in range(5))
        )

    try:
        asyncio.run(many())
    finally:
        service.close()
    assert loads == ["/some/dir"]


def test_mistral_format_tokenizers_are_not_loaded(tmp_path: Path) -> None:
    (tmp_path / "tekken.json").write_text("{}")
    with pytest.raises(ValueError, match="Mistral"):
        load_tokenizer(str(tmp_path))
