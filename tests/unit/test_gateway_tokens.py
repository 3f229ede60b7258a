"""Exact prompt tokens through the live gateway, with fake instances that tokenize as vLLM
does (the bundled model's real tokenizer): the first request of each kind is sent as text
and checked against the instance's ids, later ones carry the gateway's ids on every leg,
the echo of a text prompt is still its text, a prompt over the context gets vLLM's 400
before any leg, and instances that tokenize differently turn the ids off."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import pytest

from pdserve import bundled_model
from pdserve.gateway.tokens import Agreement, LoadedTokenizer, load_tokenizer, tokenize
from pdserve.protocol.reports import Register
from tests.unit.gateway_harness import MODEL, FakeInstance, LiveGateway

pytestmark = pytest.mark.unit

MODEL_DIR = str(bundled_model.model_dir())
LONG = "Tell me about the history of the city of Paris, its bridges and its river. " * 6
CHAT = [{"role": "user", "content": LONG}]


@pytest.fixture(scope="module")
def loaded() -> LoadedTokenizer:
    if not (bundled_model.model_dir() / "tokenizer.json").is_file():
        pytest.skip("the bundled model is not prepared (pdserve model prepare)")
    return load_tokenizer(MODEL_DIR)


class TokenizingInstance(FakeInstance):
    """A fake instance that registers the bundled tokenizer and tokenizes text prompts with
    it (``skew``: adds a token, as an instance with another tokenizer would)."""

    def __init__(self, name: str, role: str, loaded: LoadedTokenizer, skew: bool = False):
        super().__init__(name, role)
        self.loaded = loaded
        self.skew = skew

    def registration(self) -> Register:
        return msgspec.structs.replace(super().registration(), tokenizer=MODEL_DIR)

    def _prompt_ids(self, chat: bool, body: dict[str, Any]) -> list[int] | str:
        given = (body.get("kv_transfer_params") or {}).get("prompt_token_ids")
        if (chat and given is not None) or (not chat and not isinstance(body["prompt"], str)):
            return super()._prompt_ids(chat, body)
        prompts, _ = tokenize(self.loaded, "chat" if chat else "completion", body, 0)
        ids = list(prompts[0].ids or ())
        return [*ids, 1] if self.skew else ids


def cluster(loaded: LoadedTokenizer, skew: bool = False) -> list[FakeInstance]:
    prefill = TokenizingInstance("prefill-0", "prefill", loaded, skew)
    prefill.exports = True
    return [prefill, TokenizingInstance("decode-0", "decode", loaded, skew)]


def ask(gateway: LiveGateway, kind: str, **body: Any) -> httpx.Response:
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    payload = {"model": MODEL, "max_tokens": 3, **body}
    return httpx.post(gateway.url + path, json=payload, timeout=60)


def legs(gateway: LiveGateway) -> list[dict[str, Any]]:
    out = [b for i in gateway.instances for b in i.received]
    for instance in gateway.instances:
        instance.received.clear()
    return out


def metric(gateway: LiveGateway, name: str) -> dict[str, float]:
    lines = httpx.get(gateway.url + "/metrics").text.splitlines()
    return {
        line.split(" ")[0]: float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith(name + "{")
    }


def test_completions_carry_the_gateways_ids_once_the_instances_agreed(
    loaded: LoadedTokenizer,
) -> None:
    ids = list(loaded.tokenizer(LONG)["input_ids"])
    with LiveGateway(cluster(loaded)) as gateway:
        first = ask(gateway, "completion", prompt=LONG)
        assert first.status_code == 200, first.text
        # The prefill leg goes as text (the decode leg, as ever, gets the prefill's ids).
        assert legs(gateway)[0]["prompt"] == LONG
        key = (MODEL_DIR, "completion")
        assert gateway.ctx.tokens.agreements[key] is Agreement.MATCH
        second = ask(gateway, "completion", prompt=LONG)
        sent = legs(gateway)
        checks = metric(gateway, "pdserve_tokenizer_checks_total")
        counts = metric(gateway, "pdserve_prompt_counts_total")
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["usage"] == first.json()["usage"]
    assert len(sent) == 2 and all(b["prompt"] == ids for b in sent)  # prefill and decode
    assert checks == {'pdserve_tokenizer_checks_total{kind="completion",result="match"}': 1.0}
    assert counts == {'pdserve_prompt_counts_total{fallback="none",method="tokenized"}': 2.0}


def test_chat_carries_the_ids_where_vllm_takes_them(loaded: LoadedTokenizer) -> None:
    with LiveGateway(cluster(loaded)) as gateway:
        first = ask(gateway, "chat", messages=CHAT)
        assert first.status_code == 200, first.text
        prefill_leg = legs(gateway)[0]
        assert "prompt_token_ids" not in prefill_leg["kv_transfer_params"]
        second = ask(gateway, "chat", messages=CHAT)
        sent = legs(gateway)
    assert second.json()["choices"] == first.json()["choices"]
    expected = first.json()["usage"]["prompt_tokens"]
    for body in sent:  # messages stay (vLLM uses the ids instead of templating them)
        assert len(body["kv_transfer_params"]["prompt_token_ids"]) == expected
        assert body["messages"] == CHAT


def test_echo_of_a_text_prompt_is_its_text_when_ids_travel(loaded: LoadedTokenizer) -> None:
    with LiveGateway(cluster(loaded)) as gateway:
        gateway.ctx.tokens.agreements[(MODEL_DIR, "completion")] = Agreement.MATCH
        answer = ask(gateway, "completion", prompt=LONG, echo=True)
        sent = legs(gateway)
    assert answer.json()["choices"][0]["text"].startswith(LONG)
    assert all(isinstance(b["prompt"], list) and "echo" not in b for b in sent)


def test_a_prompt_over_the_context_gets_vllms_400_before_any_leg(
    loaded: LoadedTokenizer,
) -> None:
    instances = cluster(loaded)
    for instance in instances:
        instance.max_model_len = 64
    with LiveGateway(instances) as gateway:
        gateway.ctx.tokens.agreements[(MODEL_DIR, "completion")] = Agreement.MATCH
        text = ask(gateway, "completion", prompt=LONG)
        ids = ask(gateway, "completion", prompt=[5] * 100)
        sent = legs(gateway)
    assert text.status_code == 400 and ids.status_code == 400
    assert "prompt contains at least 65 input tokens" in text.json()["error"]["message"]
    assert ids.json()["error"]["param"] == "input_tokens"
    assert ids.json()["error"]["message"].endswith("(parameter=input_tokens, value=100)")
    assert sent == []


def test_instances_that_tokenize_otherwise_turn_the_ids_off(loaded: LoadedTokenizer) -> None:
    with LiveGateway(cluster(loaded, skew=True)) as gateway:
        assert ask(gateway, "completion", prompt=LONG).status_code == 200
        assert gateway.ctx.tokens.agreements[(MODEL_DIR, "completion")] is Agreement.MISMATCH
        legs(gateway)
        assert ask(gateway, "completion", prompt=LONG).status_code == 200
        sent = legs(gateway)
        counts = metric(gateway, "pdserve_prompt_counts_total")
    assert sent[0]["prompt"] == LONG  # the prefill leg: text again
    assert counts['pdserve_prompt_counts_total{fallback="mismatch",method="estimated"}'] == 1.0


def test_instances_without_a_tokenizer_leave_prompts_estimated() -> None:
    with LiveGateway() as gateway:
        assert ask(gateway, "completion", prompt="hello there").status_code == 200
        counts = metric(gateway, "pdserve_prompt_counts_total")
    assert counts == {
        'pdserve_prompt_counts_total{fallback="no_tokenizer",method="estimated"}': 1.0
    }


def test_an_instance_registers_only_a_tokenizer_the_gateway_loads_alike(tmp_path: Any) -> None:
    from argparse import Namespace

    from pdserve.instance.agent import tokenizer_of

    plain = {
        "model": str(tmp_path),
        "tokenizer": None,
        "tokenizer_mode": "auto",
        "trust_remote_code": False,
        "revision": None,
        "tokenizer_revision": None,
        "skip_tokenizer_init": False,
        "chat_template": None,
        "chat_template_content_format": "auto",
        "default_chat_template_kwargs": None,
    }
    assert tokenizer_of(Namespace(**plain)) == (str(tmp_path), True)
    assert tokenizer_of(Namespace(**{**plain, "tokenizer": "org/tok"})) == ("org/tok", True)
    assert tokenizer_of(Namespace(**{**plain, "chat_template": "t.jinja"}))[1] is False
    for changed in ({"tokenizer_mode": "mistral"}, {"trust_remote_code": True}, {"revision": "x"}):
        assert tokenizer_of(Namespace(**{**plain, **changed})) == ("", False)


def test_a_registered_tokenizer_loads_before_the_first_request(loaded: LoadedTokenizer) -> None:
    from tests.unit.test_gateway_kv_faults import wait_until

    with LiveGateway(cluster(loaded)) as gateway:
        loads = gateway.ctx.tokens._loads
        wait_until(lambda: MODEL_DIR in loads and loads[MODEL_DIR].done(), what="the load")
        assert loads[MODEL_DIR].result() is not None
