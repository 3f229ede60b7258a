"""What an instance tells the global scheduler: who it is, and how loaded it is.

Instances push these over ZeroMQ (PUSH → the scheduler's PULL socket) in the authenticated
envelope of ``pdserve.protocol.wire``. ``Register`` is repeated every few seconds, so a restarted
scheduler learns the cluster again without any instance restarting; ``LoadReport`` comes from
inside the engine at least every 100 ms and doubles as the heartbeat. ``PrefixEvents``
(``pdserve.protocol.prefix``) say what an instance's prefix cache holds.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from pdserve.protocol.prefix import PrefixEvents

Role = Literal["prefill", "decode", "both"]
ROLES: tuple[Role, ...] = ("prefill", "decode", "both")


class Register(msgspec.Struct, tag=True, frozen=True):
    instance_id: str
    role: Role
    # Base URL of the instance's OpenAI API server, as the gateway should reach it.
    url: str
    host: str
    pid: int
    model: str
    # KV server address per tensor-parallel rank, and the engine's control address.
    kv_addresses: list[str]
    control_address: str | None
    max_model_len: int
    started_at: float
    # Random per start of `pdserve instance`, also in its engine's load reports: reports of a
    # restarted process (its engine reports before its HTTP server answers) are told apart.
    incarnation: str = ""
    # Where the instance's tokenizer loads from (vLLM's --tokenizer, else the model), for
    # the gateway to count prompt tokens as vLLM does; empty where the gateway could not
    # reproduce its prompts (another tokenizer mode, remote code, a tokenizer revision).
    tokenizer: str = ""
    # False when it renders chat with options of its own (--chat-template,
    # --chat-template-content-format, --default-chat-template-kwargs).
    chat_template_default: bool = True


class Deregister(msgspec.Struct, tag=True, frozen=True):
    instance_id: str


class RunningRequest(msgspec.Struct, array_like=True, frozen=True):
    """A request the gateway manages (it carries a request key), as the engine sees it."""

    request_key: str
    num_tokens: int
    num_blocks: int
    num_output_tokens: int


class TransferCounters(msgspec.Struct, frozen=True):
    """KV transfer counters: the one struct for every stage of their way to the gateway.

    A worker counts what happened since its last step (``KVWorker.take_stats``), the
    connector carries that to the scheduler side in the step's worker metadata, adds up
    every worker's share there (``+``), and the load report carries the instance's totals.
    """

    loads_ok: int = 0
    loads_failed: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    load_seconds: float = 0.0
    pairs_opened: int = 0
    pair_setup_seconds: float = 0.0
    leases_expired: int = 0

    def __add__(self, other: TransferCounters) -> TransferCounters:
        """Field-by-field sum (counters are frozen: adding makes a new one)."""
        if not isinstance(other, TransferCounters):
            return NotImplemented
        return TransferCounters(
            *(getattr(self, name) + getattr(other, name) for name in self.__struct_fields__)
        )

    def is_zero(self) -> bool:
        return self == _NO_TRANSFERS


_NO_TRANSFERS = TransferCounters()


class KVHoldings(msgspec.Struct, frozen=True):
    """What an instance's KV data plane holds right now (gauges, not counters).

    With nothing running, every field is 0 except ``open_pairs``, which stays at most two
    per peer worker (a pair is one-way: one where this worker pulls, one where it serves):
    anything above that is a leak, visible within a report interval.
    """

    # Exports registered for a pull (finished prefills under lease, pinned live exports).
    held_exports: int = 0
    # torch.distributed process groups of two that this instance's workers keep open.
    open_pairs: int = 0
    # Transfers running now: pulls this instance serves plus pulls it makes.
    inflight_pulls: int = 0

    def combine(self, other: KVHoldings) -> KVHoldings:
        """Over tensor-parallel ranks: each rank holds a copy of the same export (max), and
        its own pairs and transfers (sum)."""
        return KVHoldings(
            held_exports=max(self.held_exports, other.held_exports),
            open_pairs=self.open_pairs + other.open_pairs,
            inflight_pulls=self.inflight_pulls + other.inflight_pulls,
        )


class StepTotals(msgspec.Struct, array_like=True, frozen=True):
    """Cumulative sums over an engine's busy steps: what they computed and how long they took.

    The features are those of the simulator's step-time model (``pdserve.sim.profile``), so
    that the gateway can fit that model online (``pdserve.scheduler.step_model``): the
    difference of two reports is the sum over the steps in between, and a linear model holds
    for sums exactly (unlike the moving averages, which mix a long prefill step into the
    decode steps after it). Cumulative, so a lost or skipped report loses nothing.
    """

    steps: int = 0
    seconds: float = 0.0
    prefill_tokens: int = 0
    # Sum over prompt chunks of chunk x (context before + chunk / 2).
    prefill_pairs: float = 0.0
    decode_seqs: int = 0
    # Context tokens the decoding sequences attended over.
    decode_context: int = 0


class PrefillRateMeter:
    """``LoadReport.prefill_tokens_per_s``: prompt tokens per second of the step time they
    took, one estimator for the instances (``pdserve.instance.engine_scheduler``) and the
    simulator's engines, so that what the gateway predicts from it is the same in both.

    Why not a moving average of each step's prompt tokens over its time: a step that
    computes a few prompt tokens among many decodes (a pulled request's last token, the tail
    of a chunked prompt, a short prompt colocated with a batch) is nearly all decode time,
    and such steps put a decoding instance's rate at a tenth of what it prefills (simulator,
    8 x qwen3-32b-h20, azure-conv at 5 req/s: median 144 tokens/s where prompts of 1,000-2,000
    tokens got their first token in 0.7-1.7 s; ``TtftPredictor`` predicted 5.7x the TTFT and
    ``--shed-over-slo`` refused 951 of 1,664 normal requests, none of which came late).
    Here a step's time is shared among its tokens (a decode is one token), the prompt tokens'
    share counted as prompt time, and the rate is the ratio of the moving sums of tokens and
    of their time, so a step of one prompt token adds one token's worth, not a sample. With
    a long queue, steps are full (``max_num_batched_tokens``) and the rate is the one the
    queue drains at.
    """

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight  # of the latest prompt step in the moving sums
        self.tokens = 0.0
        self.seconds = 0.0

    def observe(self, prefill_tokens: int, decode_seqs: int, seconds: float) -> None:
        """One busy step: its prompt tokens, its decodes and its wall time."""
        if prefill_tokens <= 0 or seconds <= 0:
            return
        share = seconds * prefill_tokens / (prefill_tokens + decode_seqs)
        self.tokens += self.weight * (prefill_tokens - self.tokens)
        self.seconds += self.weight * (share - self.seconds)

    @property
    def tokens_per_s(self) -> float:
        """0.0 until a step computed prompt tokens (readers then use their default)."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class LoadReport(msgspec.Struct, tag=True, frozen=True):
    instance_id: str
    seq: int
    num_running: int
    num_waiting: int
    # Waiting requests whose KV is being pulled from another instance.
    num_loading: int
    free_blocks: int
    total_blocks: int
    block_size: int
    # Prompt tokens admitted but not computed yet (waiting requests and unfinished prefills),
    # less the prefix-cache hit a waiting request found as it joined the queue.
    waiting_prompt_tokens: int
    # Blocks the waiting requests will need once admitted.
    waiting_blocks: int
    # Moving averages over busy engine steps (the prefill rate: ``PrefillRateMeter``).
    step_ms: float
    prefill_tokens_per_s: float
    num_preemptions: int
    incarnation: str = ""
    running: list[RunningRequest] = []
    transfers: TransferCounters = TransferCounters()
    # Running requests that have output (decoding), and their tokens (prompt + output so
    # far): the batch and context of the decode steps, for the step-time model.
    num_decoding: int = 0
    decode_context_tokens: int = 0
    # The engine's token budget per step (vLLM's max_num_batched_tokens); 0: not reported.
    max_num_batched_tokens: int = 0
    totals: StepTotals = StepTotals()


class HoldingsReport(msgspec.Struct, tag=True, frozen=True):
    """A KV worker's holdings, sent by the worker itself when they change (and every second).

    Not part of ``LoadReport``: those are built after engine steps, and an idle engine takes
    none, so a pull that ended after the last step would stay "in flight" there forever.
    """

    instance_id: str
    rank: int
    incarnation: str
    holdings: KVHoldings


ControlMessage = Register | Deregister | LoadReport | HoldingsReport | PrefixEvents
