"""What one engine holds: legs (vLLM's requests as the simulator sees them) and the limits.

A client request runs one or more legs: a prefill leg on a prefill instance, a decode leg
that pulls the prefill's KV, a continuation after a migration's cut or a failover (its prompt
is the prompt plus the output so far), a migration's one-token pre-copy. The engine calls
back the leg's owner as tokens come (``LegOwner``), so the gateway side records the client's
view of the stream.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.kv.settings import KVTransferSettings
from pdserve.sim.blocks import Chain, PrefixKey
from pdserve.sim.profile import StepProfile


class LegState(enum.Enum):
    """Where a leg is in its engine."""

    WAITING = "waiting"  # queued, holds no blocks
    LOADING = "loading"  # holds its blocks, its KV is being pulled
    READY = "ready"  # KV pulled, waits for a running slot
    RUNNING = "running"
    EXPORTED = "exported"  # ended, its blocks held for a pull (or a pin)
    FINISHED = "finished"
    ABORTED = "aborted"


class LegOwner(Protocol):
    """Who a leg reports to: the gateway session it serves, or a migration's pre-copy."""

    def leg_tokens(
        self, leg: Leg, first_at: float, last_at: float, steps: list[float], lo: int, hi: int
    ) -> None:
        """``hi - lo`` tokens, the first at ``first_at``, the last at ``last_at``; the gaps
        between them are ``steps[lo + 1 : hi]``."""

    def leg_pulled(self, leg: Leg, at: float) -> None:
        """The leg's KV arrived from its source (the source's export may be released)."""

    def leg_finished(self, leg: Leg, at: float) -> None:
        """The leg produced its last token (``max_tokens``)."""

    def leg_lost(self, leg: Leg, at: float) -> None:
        """The leg's instance died, or refused it (the connection broke)."""


@dataclass
class EngineCounters:
    """What an engine did so far (the transfer counters go into its load reports)."""

    preemptions: int = 0
    steps: int = 0
    busy_s: float = 0.0
    prefill_tokens: int = 0
    # The rest of the step-time model's features, summed over steps (``StepTotals``).
    prefill_pairs: float = 0.0
    decode_seqs: int = 0
    decode_context: int = 0
    loads_ok: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    load_seconds: float = 0.0
    # vLLM's prefix-cache counters, in tokens: a request's tokens looked up as it is
    # admitted, and those found cached.
    prefix_queries: int = 0
    prefix_hits: int = 0


class LegHost(Protocol):
    """The engine a leg is on, as the gateway side and other engines use it (the engine
    module imports this one, not the other way round)."""

    instance_id: str
    counters: EngineCounters

    def touch(self, now: float, interrupt: bool = False) -> None: ...

    def abort(self, leg: Leg, now: float) -> None: ...

    def release(self, leg: Leg, now: float) -> None: ...

    def unpin(self, leg: Leg, now: float) -> None: ...

    def pull_failed(self, leg: Leg, now: float) -> None: ...

    def next_token_at(self, leg: Leg) -> float | None: ...

    def sent(self, nbytes: int) -> None: ...


@dataclass(eq=False)
class Leg:
    """One request as one engine sees it (vLLM's ``Request``); a client request runs one or
    more legs (prefill, decode, a continuation after a migration or a failover)."""

    key: str  # the gateway's request key; "" for requests it does not list (pre-copy)
    prompt_tokens: int
    max_tokens: int
    owner: LegOwner
    chain: Chain = ()  # the named cached runs its prompt starts with
    source: Leg | None = None  # the exported leg whose KV it pulls before computing
    source_tokens: int = 0  # tokens of that KV it uses
    keep: bool = False  # export its KV when it finishes (prefill leg)
    state: LegState = LegState.WAITING
    engine: LegHost | None = None
    num_computed: int = 0
    num_output: int = 0
    queued_tokens: int = 0  # what it adds to its engine's queued tokens while it waits
    own_blocks: int = 0
    hit_blocks: int = 0  # blocks of its tokens held through cached runs
    refs: list[tuple[PrefixKey, int]] = field(default_factory=list)
    adopted: int = 0  # chain runs checked for adoption into the cache
    pinned: bool = False  # a live migration exports it: its blocks outlive an abort
    pullers: list[Leg] = field(default_factory=list)  # legs pulling from this one now
    pull_gen: int = 0
    # vLLM's request priority (lower is scheduled first; 0 unless the client sent one) and
    # arrival time (set as it reaches its engine): the order of priority scheduling.
    priority: int = 0
    arrival: float = 0.0

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.num_output

    @property
    def schedule_key(self) -> tuple[int, float]:
        """Its place under priority scheduling: lower first (vLLM's ``Request.__lt__``)."""
        return self.priority, self.arrival

    @property
    def covered_blocks(self) -> int:
        return self.own_blocks + self.hit_blocks


@dataclass(frozen=True)
class EngineConfig:
    """What bounds one engine: from the profile, with optional overrides."""

    block_size: int
    num_blocks: int
    max_num_batched_tokens: int
    max_num_seqs: int
    watermark: float = 0.0  # fraction of blocks a new request must leave free (v1: none)
    prefix_caching: bool = True
    # Loads of at most this many tokens run in the step that admits their request
    # (the connector's --kv-sync-load-max-tokens, its default).
    sync_load_max_tokens: int = KVTransferSettings.model_fields["sync_load_max_tokens"].default
    # vLLM's --priority-scheduling: the waiting queue in (priority, arrival) order, and a
    # preemption takes the running request of the lowest priority, latest arrival (FCFS
    # otherwise: arrival order, the last running one).
    priority_scheduling: bool = False
    # Decode-only runs of steps computed at once (pdserve.sim.epoch); off: step by step,
    # the same results, slower (the tests compare the two).
    epochs: bool = True

    @classmethod
    def of(cls, profile: StepProfile, **overrides: object) -> EngineConfig:
        values: dict[str, object] = {
            "block_size": profile.block_size,
            "num_blocks": profile.num_blocks,
            "max_num_batched_tokens": profile.max_num_batched_tokens,
            "max_num_seqs": profile.max_num_seqs,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
