"""Request generators: what each benchmark request asks for (prompt and output length).

A benchmark is only comparable across systems and runs if every system receives the very same
requests, so everything here is a pure function of the settings and a seed. Prompts are
token-id lists whenever a tokenizer is available: vLLM then skips tokenization and the prefill
length is exactly the sampled input length. Requests are sent with ``ignore_eos`` and
``max_tokens`` = output length, so the decode length is exact too.

Built-in workloads (lengths in tokens, before the ``max_context`` cap):

``sharegpt`` (alias ``chat``, its first name; both give the very same requests)
    ShareGPT-like. Input ~ lognormal with mean 250 (median ~150, P99 ~1.6k); output ~
    lognormal with mean 220 (median ~150, P99 ~1.1k). These are approximations of published
    ShareGPT statistics, not fits: vLLM's ``bench serve`` over
    ShareGPT_V3_unfiltered_cleaned_split (1000 prompts, Llama tokenizer) sends roughly
    200-250 input and ~200 output tokens per request on average, and the vLLM paper (Kwon et
    al., SOSP 2023, Fig. 11) reports means of ~161 input / ~338 output tokens for its
    sample; both show a heavy right tail, which the lognormal reproduces. For the dataset's
    own lengths give its JSON file instead (below).
``azure-conv``
    The "conversation" trace of Azure's public LLM inference dataset 2023
    (github.com/Azure/AzurePublicDataset, ``data/AzureLLMInferenceTrace_conv.csv``, the trace
    of Patel et al., "Splitwise", ISCA 2024): 19,366 requests, whose statistics we computed
    from the published CSV: input (ContextTokens) mean 1154.7, median 1020, P90 2735, P99 4142,
    range 2-14,050; output (GeneratedTokens) mean 211.1, median 129, P90 424, P99 601, range
    7-1000 (Splitwise's Table 2 gives the same medians, 1020 and 129). Synthesized as two
    independent lognormals clipped to those ranges, each with the trace's median and mean
    (sigma 0.498 for input, 1.0715 for output, solved for the clipped mean): means and medians
    match; the tails do not quite, since the trace is multi-modal (inputs cluster near 1k and
    4k, outputs near 100 and 400): input P90/P99 come out 1931/3250 (trace 2735/4142), output
    509/1000 (trace 424/601). The trace's input/output correlation is not kept. Its long
    prompts need ``max_context`` well above the default 2048 to keep these statistics. (The
    2024 trace of Stojkovic et al., DynamoLLM, HPCA 2025, is a separate 27M-request download
    whose statistics are not used here.)
``summarize``
    Long prompt, uniform 1000-2000, short output, uniform 50-100: prefill-heavy, like the
    summarization (LongBench) workload of DistServe (Zhong et al., OSDI 2024), truncated to a
    small model's context.
``generate``
    Short prompt, uniform 32-64, long output, uniform 300-500: decode-heavy.
``fixed``
    Every request has ``input_len`` and ``output_len``.
``conversations``
    Shared prefixes as chat traffic has them (``pdserve.workload.conversations``, whose
    docstring has the details): ``prefix_groups`` tenants with system prompts of
    ``prefix_len`` tokens, conversations of ``turns`` turns whose turn k+1 re-sends turn k's
    prompt and answer and adds a user message of ``input_len`` tokens, answers of
    ``output_len`` tokens, a think time (mean ``think_time_s``) between an answer and the
    next turn; ``rate`` stays requests per second. Prompts are token ids, or their text
    (``conversation_prompts``).

A ShareGPT JSON file (a list of ``{"conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": ...}, ...]}``) can be given instead of a name: the first human turn
is the prompt and the length of the gpt turn that answers it is the output length.

Optional features of every workload, each drawn from its own seeded stream so that turning
one on leaves the requests otherwise unchanged (but for the room a prefix takes in
``max_context``):

* priority and SLO class: ``high_priority_fraction`` of the requests, drawn at random, get
  ``priority`` 1 and ``slo_class`` "interactive"; the rest 0 and "standard" (what the
  simulator's and the gateway's priority-aware policies and per-class SLOs read).
* shared prefixes: with ``prefix_groups`` N > 0, every request belongs to one of N tenants
  (uniformly at random) whose "system prompt" of ``prefix_len`` token ids comes first in
  its prompt; the sampled prompt follows, so ``input_len`` = ``prefix_len`` + the sampled
  length (capped so that the whole request fits ``max_context``). The prefix is the same
  token ids for every request of a group, so a real vLLM's prefix cache hits on it. Token-id
  prompts only: a ShareGPT file with a prefix needs ``--tokenizer``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from pdserve.workload.arrivals import ArrivalKind, Schedule, make_schedule
from pdserve.workload.conversations import (
    ConversationShape,
    PromptFormat,
    WordTokenizer,
    build_conversations,
    conversation_schedule,
    word_token_ids,
)

CONVERSATIONS = "conversations"
BUILTIN = ("sharegpt", "chat", "azure-conv", "summarize", "generate", "fixed", CONVERSATIONS)
ALIASES = {"chat": "sharegpt"}
HIGH_PRIORITY = 1
SLO_CLASSES = ("standard", "interactive")  # of priority 0 and HIGH_PRIORITY
OPTIONAL_FEATURES = ("high_priority_fraction", "prefix_groups", "prefix_len")
# Settings of the conversations workload only: recorded only where it is the workload.
CONVERSATION_FIELDS = ("turns", "think_time_s", "conversation_prompts", "warm_tenants")
# Token ids below this are, in most vocabularies, special or byte-fallback tokens.
FIRST_PLAIN_ID = 100
# ShareGPT turns shorter than this say nothing about lengths ("hi", "ok"); vLLM skips them too.
MIN_SHAREGPT_LEN = 4
# Without a tokenizer, a ShareGPT text's token count is estimated at this many characters each.
CHARS_PER_TOKEN = 4


class WorkloadSettings(BaseModel):
    """What is sent; shared by every load point of a run, so all points get the same requests."""

    workload: str = Field(
        "sharegpt",
        description="sharegpt (alias chat), azure-conv, summarize, generate, fixed, "
        "conversations, or the path of a ShareGPT JSON file",
    )
    tokenizer: str | None = Field(
        None,
        description="local tokenizer directory (transformers AutoTokenizer) of the served "
        "model; prompts are then its token ids and ShareGPT lengths are exact",
    )
    num_requests: int = Field(200, ge=1, description="requests per load point")
    input_len: int = Field(
        256,
        ge=1,
        description="input tokens of the fixed workload; of each user message of conversations",
    )
    output_len: int = Field(
        128,
        ge=1,
        description="output tokens of the fixed workload; of each answer of conversations",
    )
    max_context: int = Field(
        2048, ge=2, description="cap on input + output tokens of every request"
    )
    vocab_size: int = Field(
        32000,
        gt=FIRST_PLAIN_ID,
        description="without --tokenizer, prompt token ids are drawn from [100, vocab_size)",
    )
    seed: int = Field(0, description="seed of lengths, prompt tokens and arrival times")
    high_priority_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="fraction of requests with priority 1 and SLO class 'interactive' "
        "(the rest: 0, 'standard')",
    )
    prefix_groups: int = Field(
        0,
        ge=0,
        description="tenants sharing a system prompt of --prefix-len tokens (0: none)",
    )
    prefix_len: int = Field(
        0,
        ge=0,
        description="tokens of each tenant's shared prefix",
    )
    turns: int = Field(
        4,
        ge=1,
        description="conversations: turns per conversation (the last one fewer, to make "
        "--num-requests); conversations start at --rate / turns per second",
    )
    think_time_s: float = Field(
        2.0,
        ge=0,
        description="conversations: mean seconds (exponential) between an answer and the "
        "conversation's next turn",
    )
    conversation_prompts: PromptFormat = Field(
        "tokens",
        description="conversations: prompts as token ids (exact), or as their text (needs "
        "--tokenizer; for routers that route on text, such as vllm-router's cache_aware)",
    )
    warm_tenants: bool = Field(
        True,
        description="conversations: before a point's schedule, send each tenant's system "
        "prompt once (1 output token, not measured): the point measures a steady state, "
        "not the tenants' first visits (which would be its P99)",
    )

    @model_serializer(mode="wrap")
    def _leave_out_what_is_off(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Optional features that are off are left out of the settings a result file records,
        so that files written before they existed read and write back unchanged."""
        data: dict[str, Any] = handler(self)
        for name in OPTIONAL_FEATURES:
            if data.get(name) == 0:
                data.pop(name)
        if data.get("workload") != CONVERSATIONS:
            for name in CONVERSATION_FIELDS:
                data.pop(name, None)
        return data

    @model_validator(mode="after")
    def _prefix_fits(self) -> WorkloadSettings:
        if self.prefix_groups and not self.prefix_len:
            raise ValueError("--prefix-groups needs --prefix-len > 0")
        if self.prefix_groups and self.prefix_len > self.max_context - 2:
            raise ValueError("--prefix-len must leave room in --max-context for 1 + 1 tokens")
        longest = self.conversation_shape().longest()
        if self.workload == CONVERSATIONS and longest > self.max_context:
            raise ValueError(
                "conversations: --prefix-len + --turns x (--input-len + --output-len) "
                f"= {longest} exceeds --max-context {self.max_context}"
            )
        return self

    def conversation_shape(self) -> ConversationShape:
        """The conversations workload's parameters, by their meaning there."""
        return ConversationShape(
            num_requests=self.num_requests,
            turns=self.turns,
            tenants=self.prefix_groups,
            system_len=self.prefix_len,
            user_len=self.input_len,
            answer_len=self.output_len,
            think_time_s=self.think_time_s,
            seed=self.seed,
        )


@dataclass(frozen=True)
class BenchRequest:
    """One request: the prompt (token ids, or text without a tokenizer) and its lengths;
    its priority and SLO class, and the shared prefix it starts with, if any."""

    prompt: list[int] | str
    input_len: int
    output_len: int
    priority: int = 0
    slo_class: str = SLO_CLASSES[0]
    prefix_group: int | None = None
    prefix_len: int = 0
    # The conversations workload: which conversation and turn (0 first), the user message
    # this turn adds, and the think time before it is sent after the previous turn's end;
    # ``warmup``: sent before the point's schedule and not measured (``split_warmup``).
    conversation: int | None = None
    turn: int = 0
    user: list[int] | str | None = None
    think_s: float = 0.0
    warmup: bool = False


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer used here (a small fake satisfies it in tests)."""

    all_special_ids: list[int]

    def __len__(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class LogNormal:
    """Lognormal parameterized by its mean (not its median) and log-space sigma, clipped."""

    mean: float
    sigma: float
    low: int
    high: int

    @classmethod
    def from_median(cls, median: float, sigma: float, low: int, high: int) -> LogNormal:
        return cls(median * math.exp(sigma**2 / 2), sigma, low, high)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        mu = np.log(self.mean) - self.sigma**2 / 2
        return np.clip(np.rint(rng.lognormal(mu, self.sigma, n)), self.low, self.high).astype(int)


@dataclass(frozen=True)
class Uniform:
    """Uniform integers in [low, high], both included."""

    low: int
    high: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low, self.high + 1, n)


Distribution = LogNormal | Uniform

SYNTHETIC: dict[str, tuple[Distribution, Distribution]] = {
    "sharegpt": (LogNormal(250, 1.0, 4, 8192), LogNormal(220, 0.9, 4, 4096)),
    # Medians and means of the Azure 2023 conversation trace (see the module docstring).
    "azure-conv": (
        LogNormal.from_median(1020, 0.498, 2, 14_050),
        LogNormal.from_median(129, 1.0715, 7, 1000),
    ),
    "summarize": (Uniform(1000, 2000), Uniform(50, 100)),
    "generate": (Uniform(32, 64), Uniform(300, 500)),
}


def load_tokenizer(path: str) -> Tokenizer:
    """A local tokenizer directory only: a benchmark must not reach for a model hub."""
    from transformers import AutoTokenizer

    return cast(Tokenizer, AutoTokenizer.from_pretrained(path, local_files_only=True))


def cap_lengths(input_len: int, output_len: int, max_context: int) -> tuple[int, int]:
    """Shortens the input first (keeping >= 1 output token), then the output, to fit."""
    input_len = max(1, min(input_len, max_context - 1))
    return input_len, max(1, min(output_len, max_context - input_len))


def plain_token_ids(tokenizer: Tokenizer | None, vocab_size: int) -> np.ndarray:
    """Ids a random prompt may use: no special tokens, which could end or reshape a prompt."""
    if tokenizer is None:
        return np.arange(FIRST_PLAIN_ID, vocab_size)
    special = set(tokenizer.all_special_ids)
    return np.array([i for i in range(len(tokenizer)) if i not in special])


def synthetic_lengths(
    settings: WorkloadSettings, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """Capped (input, output) lengths of ``settings.num_requests`` synthetic requests."""
    n = settings.num_requests
    if settings.workload == "fixed":
        pairs = [(settings.input_len, settings.output_len)] * n
    else:
        inputs, outputs = SYNTHETIC[ALIASES.get(settings.workload, settings.workload)]
        pairs = list(
            zip(inputs.sample(rng, n).tolist(), outputs.sample(rng, n).tolist(), strict=True)
        )
    # A shared prefix comes on top of the sampled prompt; the rest must fit beside it.
    room = settings.max_context - (settings.prefix_len if settings.prefix_groups else 0)
    return [cap_lengths(i, o, room) for i, o in pairs]


def synthetic_requests(
    settings: WorkloadSettings, tokenizer: Tokenizer | None = None
) -> list[BenchRequest]:
    """Random-token prompts: no prefix is shared (unless ``prefix_groups`` asks for it), so
    prefix caching cannot flatter a system."""
    rng = np.random.default_rng(settings.seed)
    vocab = plain_token_ids(tokenizer, settings.vocab_size)
    requests = [
        BenchRequest(rng.choice(vocab, i).tolist(), i, o)
        for i, o in synthetic_lengths(settings, rng)
    ]
    return with_classes(settings, requests, vocab)


def with_classes(
    settings: WorkloadSettings, requests: list[BenchRequest], vocab: np.ndarray | None
) -> list[BenchRequest]:
    """Priorities, SLO classes and shared prefixes (module docstring), each from its own
    seeded stream: the requests are otherwise unchanged."""
    n = len(requests)
    high = np.random.default_rng([settings.seed, 1]).random(n) < settings.high_priority_fraction
    groups: list[int | None] = [None] * n
    prefixes: list[list[int]] = []
    if settings.prefix_groups:
        if vocab is None or any(isinstance(r.prompt, str) for r in requests):
            raise ValueError("shared prefixes need token-id prompts: give --tokenizer")
        draw = np.random.default_rng([settings.seed, 2])
        groups = draw.integers(0, settings.prefix_groups, n).tolist()
        prefixes = [
            draw.choice(vocab, settings.prefix_len).tolist() for _ in range(settings.prefix_groups)
        ]
    out = []
    for request, is_high, group in zip(requests, high.tolist(), groups, strict=True):
        changes: dict[str, Any] = {}
        if is_high:
            changes |= {"priority": HIGH_PRIORITY, "slo_class": SLO_CLASSES[1]}
        if group is not None:
            assert isinstance(request.prompt, list)
            changes |= {
                "prompt": prefixes[group] + request.prompt,
                "input_len": settings.prefix_len + request.input_len,
                "prefix_group": group,
                "prefix_len": settings.prefix_len,
            }
        out.append(dataclasses.replace(request, **changes) if changes else request)
    return out


def first_exchange(conversation: dict[str, Any]) -> tuple[str, str] | None:
    """The first human turn and the gpt turn that answers it, if the conversation has both."""
    turns = conversation.get("conversations") or []
    for i, turn in enumerate(turns[:-1]):
        if turn.get("from") in ("human", "user") and turns[i + 1].get("from") in (
            "gpt",
            "chatgpt",
            "assistant",
        ):
            return str(turn.get("value", "")), str(turns[i + 1].get("value", ""))
    return None


def sharegpt_request(
    prompt: str, answer: str, tokenizer: Tokenizer | None, max_context: int
) -> BenchRequest | None:
    """The request for one exchange, or None if it is too short or does not fit the context.

    Oversized exchanges are skipped rather than truncated (as vLLM's benchmark does), so the
    lengths that remain are the dataset's own.
    """
    if tokenizer is None:
        ids: list[int] | str = prompt
        input_len, output_len = len(prompt) // CHARS_PER_TOKEN, len(answer) // CHARS_PER_TOKEN
    else:
        ids = list(tokenizer.encode(prompt))
        input_len, output_len = len(ids), len(tokenizer.encode(answer))
    if min(input_len, output_len) < MIN_SHAREGPT_LEN or input_len + output_len > max_context:
        return None
    return BenchRequest(ids, input_len, output_len)


def sharegpt_requests(
    path: Path, settings: WorkloadSettings, tokenizer: Tokenizer | None = None
) -> list[BenchRequest]:
    """``num_requests`` exchanges in a seeded random order, reused cyclically if too few fit.

    Only as many conversations are tokenized as needed, so a 90k-conversation file is cheap.
    """
    conversations: list[dict[str, Any]] = json.loads(path.read_text())
    order = np.random.default_rng(settings.seed).permutation(len(conversations))
    room = settings.max_context - (settings.prefix_len if settings.prefix_groups else 0)
    valid = _valid(conversations, order, tokenizer, room)
    chosen = list(itertools.islice(valid, settings.num_requests))
    if not chosen:
        raise ValueError(f"{path}: no conversation fits max_context={settings.max_context}")
    requests = [chosen[i % len(chosen)] for i in range(settings.num_requests)]
    vocab = plain_token_ids(tokenizer, settings.vocab_size) if settings.prefix_groups else None
    return with_classes(settings, requests, vocab)


def _valid(
    conversations: Sequence[dict[str, Any]],
    order: np.ndarray,
    tokenizer: Tokenizer | None,
    max_context: int,
) -> Iterator[BenchRequest]:
    for index in order:
        exchange = first_exchange(conversations[int(index)])
        if exchange is not None:
            request = sharegpt_request(*exchange, tokenizer, max_context)
            if request is not None:
                yield request


def build_workload(
    settings: WorkloadSettings, tokenizer: Tokenizer | None = None
) -> list[BenchRequest]:
    """The requests of a run; loads ``settings.tokenizer`` unless a tokenizer is passed in."""
    if tokenizer is None and settings.tokenizer:
        tokenizer = load_tokenizer(settings.tokenizer)
    if settings.workload == CONVERSATIONS:
        return conversation_requests(settings, tokenizer)
    if settings.workload in BUILTIN:
        return synthetic_requests(settings, tokenizer)
    path = Path(settings.workload)
    if not path.is_file():
        raise ValueError(f"workload {settings.workload!r}: not one of {BUILTIN} nor a file")
    return sharegpt_requests(path, settings, tokenizer)


def conversation_requests(
    settings: WorkloadSettings, tokenizer: Tokenizer | None = None
) -> list[BenchRequest]:
    """The conversations workload: the tenants' warm-up requests (``warm_tenants``), then
    conversation by conversation and turn by turn (the order of ``index``); with a
    tokenizer its word tokens, as ids or as text."""
    text = settings.conversation_prompts == "text"
    if tokenizer is not None and hasattr(tokenizer, "decode"):
        vocab = word_token_ids(cast(WordTokenizer, tokenizer))
    elif text:
        raise ValueError("--conversation-prompts text needs --tokenizer (one that decodes)")
    else:
        vocab = plain_token_ids(tokenizer, settings.vocab_size)
    decode = cast(WordTokenizer, tokenizer).decode if text else None
    shape = settings.conversation_shape()
    conversations = build_conversations(shape, vocab)
    requests = []
    if settings.warm_tenants:
        systems = {c.tenant: c.system for c in conversations if c.tenant is not None}
        for tenant, system in sorted(systems.items()):
            requests.append(
                BenchRequest(
                    prompt=decode(system) if decode else system,
                    input_len=len(system),
                    output_len=1,
                    prefix_group=tenant,
                    prefix_len=shape.system_len,
                    warmup=True,
                )
            )
    for conversation in conversations:
        for k, turn in enumerate(conversation.turns):
            requests.append(
                BenchRequest(
                    prompt=decode(turn.prompt) if decode else turn.prompt,
                    input_len=len(turn.prompt),
                    output_len=shape.answer_len,
                    prefix_group=conversation.tenant,
                    prefix_len=shape.system_len if conversation.tenant is not None else 0,
                    conversation=conversation.index,
                    turn=k,
                    user=decode(turn.user) if decode else turn.user,
                    think_s=turn.think_s,
                )
            )
    return _with_priorities(settings, requests)


def _with_priorities(
    settings: WorkloadSettings, requests: list[BenchRequest]
) -> list[BenchRequest]:
    """``high_priority_fraction`` of the requests, as ``with_classes`` draws them."""
    n = len(requests)
    high = np.random.default_rng([settings.seed, 1]).random(n) < settings.high_priority_fraction
    return [
        dataclasses.replace(r, priority=HIGH_PRIORITY, slo_class=SLO_CLASSES[1]) if h else r
        for r, h in zip(requests, high.tolist(), strict=True)
    ]


def schedule_for(
    requests: Sequence[BenchRequest],
    kind: ArrivalKind,
    load: float,
    burstiness: float = 1.0,
    seed: int = 0,
) -> Schedule:
    """A load point's schedule: one send time per request, or, for conversations, one start
    per conversation (its later turns follow their answers)."""
    starts = {r.conversation for r in requests if r.conversation is not None}
    if not starts:
        return make_schedule(kind, load, len(requests), burstiness, seed)
    turns = max(r.turn for r in requests) + 1
    return conversation_schedule(kind, load, len(starts), turns, burstiness, seed)


def units(requests: Sequence[BenchRequest]) -> list[list[int]]:
    """What a schedule starts, as indices into ``requests``: each request alone, or each
    conversation's turns in order (a turn is sent once the one before it has ended)."""
    out: list[list[int]] = []
    current: int | None = None
    for index, request in enumerate(requests):
        if request.conversation is None or request.conversation != current:
            out.append([])
        current = request.conversation
        out[-1].append(index)
    return out


def split_warmup(requests: Sequence[BenchRequest]) -> tuple[list[BenchRequest], list[BenchRequest]]:
    """(sent before the point and not measured, the point's own requests)."""
    return [r for r in requests if r.warmup], [r for r in requests if not r.warmup]
