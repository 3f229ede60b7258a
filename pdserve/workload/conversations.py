"""The ``conversations`` workload: tenants with long system prompts, chats that grow turn by turn.

Chat traffic is mostly shared prefixes: every request of a tenant starts with its system
prompt, and every turn of a conversation re-sends the whole conversation so far. A router
that sends a request where its prefix is cached turns a long prefill into a short one; this
workload is what measures that (issue 14). Its shape, every part seeded:

* ``tenants`` tenants, each with a system prompt of ``system_len`` token ids; a
  conversation belongs to one tenant, uniformly at random;
* a conversation has ``turns`` turns (the last conversation fewer, so that there are
  exactly ``num_requests`` requests); turn k's prompt is the system prompt, then every
  earlier turn's user message and answer, then its own user message of ``user_len`` tokens:
  the prefix of turn k+1 is exactly turn k's prompt and answer, token for token;
* each answer has ``answer_len`` tokens (requests are sent with ``ignore_eos``);
* conversations start at the times of an arrival process (``make_schedule``) at a rate of
  ``rate / turns`` conversations per second, so that ``rate`` stays requests per second;
  turn k+1 is sent a think time after turn k's answer ended, exponential with mean
  ``think_time_s`` (0: at once): a conversation's next turn waits for its previous answer.

The answers: a real model's answer is only known once it has been generated, so the
benchmark client builds turn k+1 from turn k's actual output token ids (``next_prompt``).
The prompts this module makes use *sampled* answers instead (``answer_len`` token ids drawn
per turn), which is what the simulator sends (its answers have exactly that length), and
what a request's ``input_len`` counts either way.

Token ids: with a tokenizer they are drawn from its *word tokens* (a space and lowercase
letters whose text encodes back to that one id), so that a prompt's text tokenizes back to
exactly its ids; a prompt can then also be sent as text (``PromptFormat``), which a router
that routes on text (vllm-router's ``cache_aware``) needs, with the same prefix-cache
behaviour. Without a tokenizer the ids are drawn from ``vocab``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from pdserve.workload.arrivals import ArrivalKind, Schedule, make_schedule

# How prompts are sent: token ids (exact), or their text (for routers that read text).
PromptFormat = Literal["tokens", "text"]
PROMPT_FORMATS: tuple[PromptFormat, ...] = ("tokens", "text")
# A word token's text: one space, then two or more lowercase letters.
_WORD = re.compile(r" [a-z]{2,}")
# Seeded streams of their own (0 and 1 are the lengths' and the priorities').
_TENANTS, _USERS, _ANSWERS, _THINK = 2, 3, 4, 5


class WordTokenizer(Protocol):
    """What the word vocabulary needs of a tokenizer."""

    def __len__(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class ConversationShape:
    """The workload's parameters (``WorkloadSettings``' fields, under their meaning here)."""

    num_requests: int
    turns: int
    tenants: int  # 0: no system prompt
    system_len: int
    user_len: int
    answer_len: int
    think_time_s: float
    seed: int

    @property
    def conversations(self) -> int:
        return math.ceil(self.num_requests / self.turns)

    def longest(self) -> int:
        """Tokens of a whole conversation: its last prompt and answer."""
        system = self.system_len if self.tenants else 0
        return system + self.turns * (self.user_len + self.answer_len)


@dataclass(frozen=True)
class Turn:
    """One turn: its prompt (with the sampled answers before it), the user message it adds,
    the sampled answer, and the think time before it is sent (0 for a first turn)."""

    prompt: list[int]
    user: list[int]
    answer: list[int]
    think_s: float


@dataclass(frozen=True)
class Conversation:
    index: int
    tenant: int | None
    system: list[int]
    turns: list[Turn]


def word_token_ids(tokenizer: WordTokenizer) -> np.ndarray:
    """Ids whose text is a space and a lowercase word and encodes back to that id alone:
    a sequence of them decodes to text that encodes back to the very same ids."""
    words = []
    for token in range(len(tokenizer)):
        text = tokenizer.decode([token])
        if _WORD.fullmatch(text) and list(tokenizer.encode(text)) == [token]:
            words.append(token)
    if not words:
        raise ValueError("the tokenizer has no word tokens (' word' that encodes to one id)")
    return np.asarray(words)


def build_conversations(shape: ConversationShape, vocab: np.ndarray) -> list[Conversation]:
    """Every conversation of the workload, from its own seeded streams."""
    pick = np.random.default_rng([shape.seed, _TENANTS])
    tenants = pick.integers(0, max(shape.tenants, 1), shape.conversations).tolist()
    systems = [pick.choice(vocab, shape.system_len).tolist() for _ in range(shape.tenants)]
    users = np.random.default_rng([shape.seed, _USERS])
    answers = np.random.default_rng([shape.seed, _ANSWERS])
    think = np.random.default_rng([shape.seed, _THINK])
    out = []
    for index, tenant in enumerate(tenants):
        count = min(shape.turns, shape.num_requests - index * shape.turns)
        system = systems[tenant] if shape.tenants else []
        prompt: list[int] = list(system)
        turns = []
        for k in range(count):
            user = users.choice(vocab, shape.user_len).tolist()
            answer = answers.choice(vocab, shape.answer_len).tolist()
            pause = float(think.exponential(shape.think_time_s)) if shape.think_time_s else 0.0
            prompt = prompt + user
            turns.append(Turn(prompt, user, answer, pause if k else 0.0))
            prompt = prompt + answer
        out.append(Conversation(index, tenant if shape.tenants else None, system, turns))
    return out


def next_prompt(
    previous: Sequence[int] | str, answer: Sequence[int] | str, user: Sequence[int] | str
) -> list[int] | str:
    """Turn k+1's prompt from turn k's prompt as sent, its actual answer and the new user
    message: token ids stay exact, text is concatenated (both of one kind)."""
    if isinstance(previous, str):
        assert isinstance(answer, str) and isinstance(user, str)
        return previous + answer + user
    assert not isinstance(answer, str) and not isinstance(user, str)
    return [*previous, *answer, *user]


def conversation_schedule(
    kind: ArrivalKind,
    load: float,
    conversations: int,
    turns: int,
    burstiness: float = 1.0,
    seed: int = 0,
) -> Schedule:
    """When conversations start: an open loop at ``load / turns`` conversations per second
    (``load`` requests per second in the long run), or ``load`` conversations at a time."""
    if kind == "closed":
        return make_schedule(kind, load, conversations, burstiness, seed)
    return make_schedule(kind, load / turns, conversations, burstiness, seed)
