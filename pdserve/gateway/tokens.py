"""Prompt tokens counted at the gateway as vLLM will count them.

Dispatch, admission control and the context-length check need a request's prompt tokens
before any instance sees it. The gateway tokenizes each prompt with the served model's own
tokenizer (transformers' ``AutoTokenizer``, the fast one where the model has it: what vLLM
0.32 loads) and, for chat, renders the chat template as vLLM does (``chat_render``). The
tokenizer is the one the model's instances register (``Register.tokenizer``: a directory on
this machine, or a Hugging Face name in the local cache; nothing is downloaded), or the
gateway's ``--prompt-tokenizer``. Loading and tokenizing run in a thread pool, off the event
loop; each tokenizer is loaded once.

How far a count is trusted:

- a *token-id prompt* is its own count (``Counting.TOKEN_IDS``);
- a *tokenized* prompt is trusted once the instances agreed: the first requests of each kind
  (completion, chat) for a tokenizer go to the instances as text, and the token ids the
  instance reports are compared with the gateway's (``Counted.confirm``). After a match, the
  gateway's ids replace the text on every leg (instances tokenize nothing), and the
  gateway answers a prompt over the model's context with vLLM's own 400 before any leg
  starts. A mismatch turns that kind off for the tokenizer (estimates from then on, logged
  and counted) so that outputs stay those of plain vLLM;
- requests whose rendering depends on more than the gateway reproduces for sure (tools,
  ``echo`` in chat, truncation, offsets) are counted but never sent as ids;
- where no tokenizer can be loaded (a model path on another machine, a Mistral-format
  tokenizer, ``--prompt-tokenizer none``) or a request is one the gateway does not render,
  the old estimate (about 4 characters a token) is used: ``Counting.ESTIMATED`` with its
  ``Fallback``, counted in ``pdserve_prompt_counts_total{method, fallback}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import math
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.gateway.chat_render import ContentFormat, Unsupported, content_format, render
from pdserve.gateway.errors import APIError
from pdserve.gateway.openai_api import (
    ChatRequest,
    CompletionRequest,
    Kind,
    Service,
    estimate_of,
    prompt_estimates,
)
from pdserve.logs import get_logger
from pdserve.scheduler.snapshot import RequestEstimate

logger = get_logger(__name__)

# Fields whose effect on the prompt (or on the answer to a text prompt) token ids would
# change: requests with any of them are counted but never sent as ids.
TEXT_FIELDS = {
    "completion": ("suffix", "return_prompt_text", "return_token_offsets", "prompt_embeds"),
    "chat": ("tools", "echo", "return_prompt_text", "return_token_offsets"),
}
TRUNCATION_FIELDS = ("truncate_prompt_tokens", "truncation_side")


class Counting(enum.StrEnum):
    """How a request's prompt tokens were counted (``pdserve_prompt_counts{method}``)."""

    TOKEN_IDS = "token_ids"  # the client sent token ids
    TOKENIZED = "tokenized"  # the gateway's tokenizer and chat template, as vLLM's
    ESTIMATED = "estimated"  # about 4 characters a token


class Fallback(enum.StrEnum):
    """Why a prompt was estimated (``pdserve_prompt_counts{fallback}``)."""

    NONE = "none"  # not estimated
    DISABLED = "disabled"  # --prompt-tokenizer none
    NO_TOKENIZER = "no_tokenizer"  # none registered, or it cannot be loaded on this machine
    UNSUPPORTED = "unsupported"  # a request the gateway does not render as vLLM would
    MISMATCH = "mismatch"  # the instances tokenized this kind of request differently
    ERROR = "error"  # the template or the tokenizer raised (vLLM answers the request)


class Agreement(enum.StrEnum):
    """What the instances said of a tokenizer's ids (``pdserve_tokenizer_checks{result}``)."""

    UNVERIFIED = "unverified"
    MATCH = "match"
    MISMATCH = "mismatch"


@dataclass(frozen=True)
class Prompt:
    """One prompt as counted: its tokens, its ids where known, and the characters of the
    text vLLM checks before tokenizing (the prompt, or the rendered chat template)."""

    tokens: int
    ids: tuple[int, ...] | None = None
    chars: int | None = None


@dataclass(frozen=True)
class Counted:
    """The prompts of one request (one per prompt of a batch), and how far to trust them.

    ``trusted``: the count is vLLM's for sure, so the gateway may refuse an over-long prompt
    itself and send the ids instead of the text. ``verifier``: set while the tokenizer is
    unverified for this kind of request; ``confirm`` hands it the instance's ids.
    """

    prompts: tuple[Prompt, ...]
    method: Counting
    fallback: Fallback = Fallback.NONE
    trusted: bool = False
    max_model_len: int = 0
    max_chars_per_token: int = 0
    verifier: Callable[[tuple[int, ...], list[int]], None] | None = field(
        default=None, compare=False, repr=False
    )

    @property
    def total(self) -> int:
        return sum(p.tokens for p in self.prompts)

    @property
    def send_ids(self) -> bool:
        """The gateway's ids replace the prompt's text on the legs."""
        return self.trusted and self.method is Counting.TOKENIZED

    def one(self, index: int) -> Counted:
        """Prompt ``index`` of a batch, as a request of its own (``fanout``)."""
        return dataclasses.replace(self, prompts=(self.prompts[index],))

    def ids(self) -> tuple[int, ...] | None:
        """The token ids of a single-prompt request, where the gateway knows them."""
        return self.prompts[0].ids if len(self.prompts) == 1 else None

    def confirm(self, theirs: list[int] | None) -> None:
        """Compares the instance's prompt ids with the gateway's (once per request)."""
        ours = self.ids()
        if self.verifier is not None and ours is not None and theirs is not None:
            self.verifier(ours, theirs)


def _too_long(message: str, parameter: str, value: int) -> APIError:
    """vLLM's ``VLLMValidationError`` as its server answers it (message with its details)."""
    text = f"{message} (parameter={parameter}, value={value})"
    return APIError(400, text, param=parameter)


def context_error(counted: Counted) -> APIError | None:
    """vLLM's 400 for a prompt over the model's context, where the count is vLLM's: its
    character bound (checked before tokenizing), then its token bound (vLLM tokenizes a text
    prompt up to one token past the limit, hence "at least")."""
    limit = counted.max_model_len
    if not counted.trusted or limit <= 0:
        return None
    context = f"This model's maximum context length is {limit} tokens. However, your prompt"
    for prompt in counted.prompts:
        chars = limit * counted.max_chars_per_token
        if prompt.chars is not None and chars and prompt.chars > chars:
            return _too_long(
                f"{context} contains {prompt.chars} characters (more than {chars} characters, "
                f"which is the upper bound for {limit} input tokens). Please reduce the length "
                "of the input prompt.",
                "input_text",
                prompt.chars,
            )
        if prompt.tokens > limit:
            count = prompt.tokens if prompt.chars is None else min(prompt.tokens, limit + 1)
            qualifier = "at least " if count == limit + 1 else ""
            return _too_long(
                f"{context} contains {qualifier}{count} input tokens, which exceeds this limit "
                "even without any output tokens. Please reduce the length of the input prompt.",
                "input_tokens",
                count,
            )
    return None


def estimated(
    request: ChatRequest | CompletionRequest, fallback: Fallback, max_model_len: int = 0
) -> Counted:
    prompts = tuple(Prompt(n) for n in prompt_estimates(request))
    return Counted(prompts, Counting.ESTIMATED, fallback, max_model_len=max_model_len)


def estimate_for(
    request: ChatRequest | CompletionRequest, service: Service, counted: Counted | None
) -> RequestEstimate:
    """What the policies know of a request: its counted prompt tokens and ids, and an output
    budget no larger than the context leaves (vLLM clamps ``max_tokens`` so)."""
    base = estimate_of(request, service)
    if counted is None:
        return base
    budget = base.max_tokens
    if counted.method is not Counting.ESTIMATED and counted.max_model_len > counted.total:
        budget = min(budget, counted.max_model_len - counted.total)
    return dataclasses.replace(
        base,
        prompt_tokens=counted.total,
        max_tokens=budget,
        prompt_token_ids=counted.ids() or base.prompt_token_ids,
    )


# --- in the worker threads ---------------------------------------------------------------


@dataclass(frozen=True)
class LoadedTokenizer:
    source: str
    tokenizer: Any
    # vLLM's bound of characters per token (the longest vocabulary entry).
    max_chars_per_token: int


def load_tokenizer(source: str) -> LoadedTokenizer:
    """Loads a tokenizer as vLLM's ``get_tokenizer`` does for its HF mode, from local files
    only. Mistral-format tokenizers (vLLM's own mode) are refused."""
    path = Path(source)
    if path.is_dir() and ((path / "tekken.json").exists() or any(path.glob("tokenizer.model.v*"))):
        raise ValueError("a Mistral-format tokenizer, which vLLM loads with its own code")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, truncation_side="left")
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return LoadedTokenizer(source, tokenizer, longest)


@functools.lru_cache(maxsize=16)
def _content_format(template: str) -> ContentFormat | None:
    return content_format(template)


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise Unsupported(f"{name} that is not a boolean")
    return value


def _truncated(tokens: int, body: Mapping[str, Any], max_model_len: int) -> int:
    """The tokens left after vLLM's ``truncate_prompt_tokens`` (-1: the context less one)."""
    keep = body.get("truncate_prompt_tokens")
    if not isinstance(keep, int) or isinstance(keep, bool):
        return tokens
    if keep < 0:
        keep = max(0, max_model_len - 1) if max_model_len else tokens
    return min(tokens, keep)


def _encode(
    loaded: LoadedTokenizer, text: str, special: bool, body: Mapping[str, Any], limit: int
) -> Prompt:
    """One text as vLLM tokenizes it. A text over vLLM's character bound is not tokenized
    (vLLM refuses it unread): its count is an estimate, and ``chars`` says why."""
    if limit and len(text) > limit * loaded.max_chars_per_token:
        return Prompt(math.ceil(len(text) / 4), None, len(text))
    # No truncation or padding arguments: they would reconfigure the shared tokenizer,
    # which is then unsafe to call from several threads at once.
    ids = loaded.tokenizer(text, add_special_tokens=special)["input_ids"]
    tokens = _truncated(len(ids), body, limit)
    return Prompt(tokens, tuple(ids) if tokens == len(ids) else None, len(text))


def _plain(kind: Kind, body: Mapping[str, Any]) -> bool:
    """Whether the gateway's ids may stand for the request's prompt on the legs."""
    fields = (*TEXT_FIELDS[kind], *TRUNCATION_FIELDS)
    return all(body.get(name) is None for name in fields)


def tokenize(
    loaded: LoadedTokenizer, kind: Kind, body: Mapping[str, Any], max_model_len: int
) -> tuple[list[Prompt], bool]:
    """The prompts of a request body (``model_dump``), and whether it is plain."""
    if kind == "completion":
        special = _flag(body, "add_special_tokens", True)
        prompt = body["prompt"]
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
    else:
        special = _flag(body, "add_special_tokens", False)
        tools = body.get("tools") or None
        template = loaded.tokenizer.get_chat_template(None, tools)
        texts = [render(loaded.tokenizer, template, _content_format(template), body, tools)]
    prompts = [_encode(loaded, t, special, body, max_model_len) for t in texts]
    return prompts, _plain(kind, body)


# --- the service --------------------------------------------------------------------------


def given_ids(request: ChatRequest | CompletionRequest) -> list[list[int]] | None:
    """The prompts of a completion whose prompt is token ids (one, or a batch)."""
    prompt = request.prompt if isinstance(request, CompletionRequest) else None
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        return list(prompt)  # type: ignore[arg-type]
    return None


class Tokenizers:
    """The gateway's tokenizers: each loaded once, used from ``threads`` worker threads.

    ``setting``: the gateway's ``--prompt-tokenizer`` (``auto``: the registered one,
    ``none``, or a tokenizer for every model). ``on_check``: told each verification's outcome.
    """

    def __init__(
        self,
        setting: str,
        threads: int,
        on_check: Callable[[Kind, Agreement], object] = lambda kind, agreement: None,
    ) -> None:
        self.setting = setting
        self.on_check = on_check
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="pdserve-tokenize")
        self._loads: dict[str, Future[LoadedTokenizer | None]] = {}
        self.agreements: dict[tuple[str, Kind], Agreement] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def source(self, registered: str | None) -> str | None:
        """Where a model's tokenizer loads from: the setting, else what its instances said."""
        if self.setting == "none":
            return None
        if self.setting == "auto":
            return registered or None
        return self.setting

    async def count(
        self,
        kind: Kind,
        request: ChatRequest | CompletionRequest,
        registered: str | None,
        max_model_len: int,
        chat_default: bool = True,
    ) -> Counted:
        """The request's prompts, counted as vLLM will (or estimated, saying why).
        ``chat_default``: the instances render chat with the tokenizer's template and
        vLLM's default options (the gateway renders nothing else)."""
        ids = given_ids(request)
        if ids is not None:
            prompts = tuple(Prompt(len(p), tuple(p)) for p in ids)
            return Counted(prompts, Counting.TOKEN_IDS, trusted=True, max_model_len=max_model_len)
        source = self.source(registered)
        if source is None:
            fallback = Fallback.DISABLED if self.setting == "none" else Fallback.NO_TOKENIZER
            return estimated(request, fallback, max_model_len)
        if kind == "chat" and not chat_default and self.setting == "auto":
            return estimated(request, Fallback.UNSUPPORTED, max_model_len)
        loaded = await self._load(source)
        if loaded is None:
            return estimated(request, Fallback.NO_TOKENIZER, max_model_len)
        agreement = self.agreements.get((source, kind), Agreement.UNVERIFIED)
        if agreement is Agreement.MISMATCH:
            return estimated(request, Fallback.MISMATCH, max_model_len)
        return await self._tokenized(loaded, kind, request, agreement, max_model_len)

    async def _tokenized(
        self,
        loaded: LoadedTokenizer,
        kind: Kind,
        request: ChatRequest | CompletionRequest,
        agreement: Agreement,
        max_model_len: int,
    ) -> Counted:
        body = request.model_dump(exclude_unset=True)
        loop = asyncio.get_running_loop()
        try:
            prompts, plain = await loop.run_in_executor(
                self._pool, tokenize, loaded, kind, body, max_model_len
            )
        except Unsupported as e:
            logger.debug("pdserve: prompt estimated: %s", e)
            return estimated(request, Fallback.UNSUPPORTED, max_model_len)
        except Exception as e:  # a template that raises: vLLM answers with its own error
            logger.debug("pdserve: prompt estimated: the tokenizer raised %r", e)
            return estimated(request, Fallback.ERROR, max_model_len)
        checking = plain and agreement is Agreement.UNVERIFIED
        return Counted(
            tuple(prompts),
            Counting.TOKENIZED,
            trusted=plain and agreement is Agreement.MATCH,
            max_model_len=max_model_len,
            max_chars_per_token=loaded.max_chars_per_token,
            verifier=functools.partial(self._confirm, loaded.source, kind) if checking else None,
        )

    def preload(self, registered: str | None) -> None:
        """Starts loading a registered tokenizer, so that the model's first request does
        not wait for it (transformers' import alone takes seconds)."""
        source = self.source(registered)
        if source is not None:
            self._loading(source)

    def _loading(self, source: str) -> Future[LoadedTokenizer | None]:
        future = self._loads.get(source)
        if future is None:
            future = self._loads[source] = self._pool.submit(_load_or_none, source)
        return future

    async def _load(self, source: str) -> LoadedTokenizer | None:
        # Shielded: a client leaving does not cancel a load other requests wait for.
        return await asyncio.shield(asyncio.wrap_future(self._loading(source)))

    def _confirm(self, source: str, kind: Kind, ours: tuple[int, ...], theirs: list[int]) -> None:
        agreement = Agreement.MATCH if list(ours) == list(theirs) else Agreement.MISMATCH
        key = (source, kind)
        before = self.agreements.get(key, Agreement.UNVERIFIED)
        self.on_check(kind, agreement)
        if before is Agreement.MISMATCH or before is agreement:
            return
        self.agreements[key] = agreement
        if agreement is Agreement.MISMATCH:
            logger.warning(
                "pdserve: the instances tokenize %s prompts differently from %s (%d tokens "
                "there, %d here); estimating them from now on",
                kind,
                source,
                len(theirs),
                len(ours),
            )


def _load_or_none(source: str) -> LoadedTokenizer | None:
    try:
        return load_tokenizer(source)
    except Exception as e:
        logger.warning(
            "pdserve: cannot load the tokenizer %s here (%s); its prompts are estimated",
            source,
            e,
        )
        return None
