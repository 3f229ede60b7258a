"""Request generators: what each benchmark request asks for (prompt and output length).

A benchmark is only comparable across systems and runs if every system receives the very same
requests, so everything here is a pure function of the settings and a seed. Prompts are
token-id lists whenever a tokenizer is available: vLLM then skips tokenization and the prefill
length is exactly the sampled input length. Requests are sent with ``ignore_eos`` and
``max_tokens`` = output length, so the decode length is exact too.

Built-in workloads (lengths in tokens, before the ``max_context`` cap):

``chat``
    ShareGPT-like. Input ~ lognormal with mean 250 (median ~150, P99 ~1.6k); output ~
    lognormal with mean 220 (median ~150, P99 ~1.1k). These are approximations of published
    ShareGPT statistics, not fits: vLLM's ``bench serve`` over
    ShareGPT_V3_unfiltered_cleaned_split (1000 prompts, Llama tokenizer) sends roughly
    200-250 input and ~200 output tokens per request on average, and the vLLM paper (Kwon et
    al., SOSP 2023, Fig. 11) reports means of ~161 input / ~338 output tokens for its
    sample; both show a heavy right tail, which the lognormal reproduces.
``summarize``
    Long prompt, uniform 1000-2000, short output, uniform 50-100: prefill-heavy, like the
    summarization (LongBench) workload of DistServe (Zhong et al., OSDI 2024), truncated to a
    small model's context.
``generate``
    Short prompt, uniform 32-64, long output, uniform 300-500: decode-heavy.
``fixed``
    Every request has ``input_len`` and ``output_len``.

A ShareGPT JSON file (a list of ``{"conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": ...}, ...]}``) can be given instead of a name: the first human turn
is the prompt and the length of the gpt turn that answers it is the output length.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
from pydantic import BaseModel, Field

BUILTIN = ("chat", "summarize", "generate", "fixed")
# Token ids below this are, in most vocabularies, special or byte-fallback tokens.
FIRST_PLAIN_ID = 100
# ShareGPT turns shorter than this say nothing about lengths ("hi", "ok"); vLLM skips them too.
MIN_SHAREGPT_LEN = 4
# Without a tokenizer, a ShareGPT text's token count is estimated at this many characters each.
CHARS_PER_TOKEN = 4


class WorkloadSettings(BaseModel):
    """What is sent; shared by every load point of a run, so all points get the same requests."""

    workload: str = Field(
        "chat",
        description="chat, summarize, generate, fixed, or the path of a ShareGPT JSON file",
    )
    tokenizer: str | None = Field(
        None,
        description="local tokenizer directory (transformers AutoTokenizer) of the served "
        "model; prompts are then its token ids and ShareGPT lengths are exact",
    )
    num_requests: int = Field(200, ge=1, description="requests per load point")
    input_len: int = Field(256, ge=1, description="input tokens of the fixed workload")
    output_len: int = Field(128, ge=1, description="output tokens of the fixed workload")
    max_context: int = Field(
        2048, ge=2, description="cap on input + output tokens of every request"
    )
    vocab_size: int = Field(
        32000,
        gt=FIRST_PLAIN_ID,
        description="without --tokenizer, prompt token ids are drawn from [100, vocab_size)",
    )
    seed: int = Field(0, description="seed of lengths, prompt tokens and arrival times")


@dataclass(frozen=True)
class BenchRequest:
    """One request: the prompt (token ids, or text without a tokenizer) and its lengths."""

    prompt: list[int] | str
    input_len: int
    output_len: int


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
    "chat": (LogNormal(250, 1.0, 4, 8192), LogNormal(220, 0.9, 4, 4096)),
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
        inputs, outputs = SYNTHETIC[settings.workload]
        pairs = list(
            zip(inputs.sample(rng, n).tolist(), outputs.sample(rng, n).tolist(), strict=True)
        )
    return [cap_lengths(i, o, settings.max_context) for i, o in pairs]


def synthetic_requests(
    settings: WorkloadSettings, tokenizer: Tokenizer | None = None
) -> list[BenchRequest]:
    """Random-token prompts: no prefix is shared, so prefix caching cannot flatter a system."""
    rng = np.random.default_rng(settings.seed)
    vocab = plain_token_ids(tokenizer, settings.vocab_size)
    return [
        BenchRequest(rng.choice(vocab, i).tolist(), i, o)
        for i, o in synthetic_lengths(settings, rng)
    ]


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
    valid = _valid(conversations, order, tokenizer, settings)
    chosen = list(itertools.islice(valid, settings.num_requests))
    if not chosen:
        raise ValueError(f"{path}: no conversation fits max_context={settings.max_context}")
    return [chosen[i % len(chosen)] for i in range(settings.num_requests)]


def _valid(
    conversations: Sequence[dict[str, Any]],
    order: np.ndarray,
    tokenizer: Tokenizer | None,
    settings: WorkloadSettings,
) -> Iterator[BenchRequest]:
    for index in order:
        exchange = first_exchange(conversations[int(index)])
        if exchange is not None:
            request = sharegpt_request(*exchange, tokenizer, settings.max_context)
            if request is not None:
                yield request


def build_workload(
    settings: WorkloadSettings, tokenizer: Tokenizer | None = None
) -> list[BenchRequest]:
    """The requests of a run; loads ``settings.tokenizer`` unless a tokenizer is passed in."""
    if tokenizer is None and settings.tokenizer:
        tokenizer = load_tokenizer(settings.tokenizer)
    if settings.workload in BUILTIN:
        return synthetic_requests(settings, tokenizer)
    path = Path(settings.workload)
    if not path.is_file():
        raise ValueError(f"workload {settings.workload!r}: not one of {BUILTIN} nor a file")
    return sharegpt_requests(path, settings, tokenizer)
