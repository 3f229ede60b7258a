"""The load report of a simulated engine, field by field as the real instance fills it.

``pdserve.instance.engine_scheduler.LoadReporter.observe`` is the model: running requests
(with a request key: the first ``MAX_LISTED_REQUESTS`` of them listed with their tokens,
blocks and output tokens), waiting ones (the queue and those holding blocks: pulls in
flight and pulled requests waiting for a slot), free and total blocks, the prompt tokens not
computed yet (unfinished prompts of running requests, everything the waiting have left), the
blocks the plain waiting queue will want, the moving averages, cumulative preemptions and
transfer counters; the decoding requests and their context tokens, the step budget and the
step-time model's totals (``StepTotals``, of the steps applied so far: an epoch's steps
count once applied).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from pdserve.protocol.reports import (
    LoadReport,
    PrefillRateMeter,
    RunningRequest,
    StepTotals,
    TransferCounters,
)
from pdserve.sim.blocks import BlockPool
from pdserve.sim.epoch import Epoch
from pdserve.sim.legs import EngineConfig, EngineCounters, Leg

MAX_LISTED_REQUESTS = 512  # as the real reporter


class Reported(Protocol):
    """What a report reads of an engine (``pdserve.sim.engine.SimEngine``)."""

    instance_id: str
    incarnation: str
    block_size: int
    running: list[Leg]
    pool: BlockPool
    config: EngineConfig
    counters: EngineCounters
    step_ms: float
    prefill_rate: PrefillRateMeter
    transfers: TransferCache
    list_running: bool  # list the running requests (else nobody reads them)
    waiting_tokens: int  # uncached tokens of the waiting queue (kept as it changes)
    waiting_blocks: int

    @property
    def waiting(self) -> Sequence[Leg]: ...

    @property
    def ready(self) -> Collection[Leg]: ...

    @property
    def loading(self) -> Collection[Leg]: ...


class TransferCache:
    """The transfer counters as a report carries them, made again only when they changed."""

    def __init__(self) -> None:
        self._counters = TransferCounters()

    def of(self, c: EngineCounters) -> TransferCounters:
        t = self._counters
        if (
            c.loads_ok != t.loads_ok
            or c.bytes_received != t.bytes_received
            or c.bytes_sent != t.bytes_sent
            or c.load_seconds != t.load_seconds
        ):  # field by field: cheaper than a key tuple per report
            t = self._counters = TransferCounters(
                loads_ok=c.loads_ok,
                bytes_received=c.bytes_received,
                bytes_sent=c.bytes_sent,
                load_seconds=c.load_seconds,
            )
        return t


def load_report(
    engine: Reported,
    seq: int,
    ahead: int = 0,
    in_flight: bool = False,
    epoch: Epoch | None = None,
) -> LoadReport:
    """The engine's report, ``ahead`` epoch steps after its applied state (``in_flight``:
    the next step has started, so has its blocks), which is cheaper than applying them;
    in an ``intact`` epoch, from what the epoch kept of its requests (the same numbers as
    a pass over them)."""
    bs = engine.block_size
    running = engine.running
    request = RunningRequest
    listed = (
        [
            request(leg.key, tokens, -(-tokens // bs), leg.num_output + ahead)
            for leg in running[:MAX_LISTED_REQUESTS]
            if leg.key and (tokens := leg.prompt_tokens + leg.num_output + ahead)
        ]
        if engine.list_running
        else []
    )
    free = engine.pool.free
    queued = engine.waiting_tokens
    extra = ahead + int(in_flight)
    decoding = context = 0
    if epoch is not None and epoch.intact:
        # Every request decodes; each applied or ``ahead`` step added one token to each.
        decoding = epoch.seqs
        context = epoch.tokens + decoding * (epoch.applied + ahead)
        if ahead:
            free -= epoch.blocks_by(epoch.applied + extra) - epoch.allocated
        running = []
    for leg in running:
        if leg.num_output or ahead:
            decoding += 1
            context += leg.prompt_tokens + leg.num_output + ahead
        computed = leg.num_computed
        if computed < leg.prompt_tokens:
            queued += leg.prompt_tokens - computed
        if ahead:
            new = -(-(computed + extra) // bs) - leg.own_blocks - leg.hit_blocks
            if new > 0:
                free -= new
    for leg in engine.loading:
        queued += leg.num_tokens - leg.num_computed
    for leg in engine.ready:
        queued += leg.num_tokens - leg.num_computed
    return LoadReport(
        instance_id=engine.instance_id,
        seq=seq,
        num_running=len(engine.running),
        num_waiting=len(engine.waiting) + len(engine.loading) + len(engine.ready),
        num_loading=len(engine.loading),
        free_blocks=free,
        total_blocks=engine.pool.total,
        block_size=bs,
        waiting_prompt_tokens=queued,
        waiting_blocks=engine.waiting_blocks,
        step_ms=engine.step_ms,
        prefill_tokens_per_s=engine.prefill_rate.tokens_per_s,
        num_preemptions=engine.counters.preemptions,
        incarnation=engine.incarnation,
        running=listed,
        transfers=engine.transfers.of(engine.counters),
        num_decoding=decoding,
        decode_context_tokens=context,
        max_num_batched_tokens=engine.config.max_num_batched_tokens,
        totals=step_totals(engine.counters),
    )


def step_totals(c: EngineCounters) -> StepTotals:
    """The engine's step-time totals as a report carries them."""
    return StepTotals(
        c.steps, c.busy_s, c.prefill_tokens, c.prefill_pairs, c.decode_seqs, c.decode_context
    )
