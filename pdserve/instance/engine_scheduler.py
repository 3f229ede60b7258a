"""Load reports from inside the engine: a thin ``Scheduler`` subclass (``--scheduler-cls``).

Only vLLM's scheduler sees the exact state the global scheduler needs: the waiting queue and
its prompt tokens, free blocks, step times, preemptions, and which managed requests run
here. After every ``schedule()`` the subclass takes a snapshot on the engine thread (a few
microseconds for a few hundred requests); a reporter thread sends the latest snapshot every
``report_interval_s``, also while the engine idles, so reports double as heartbeats.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from pdserve.kv.messages import parse_params
from pdserve.kv.settings import KVSettings, from_extra_config
from pdserve.logs import get_logger
from pdserve.protocol.net import cdiv, is_loopback
from pdserve.protocol.push import PeriodicPusher
from pdserve.protocol.reports import (
    LoadReport,
    PrefillRateMeter,
    RunningRequest,
    StepTotals,
    TransferCounters,
)
from pdserve.protocol.wire import cluster_secret

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = get_logger(__name__)

_EMA = 0.2
MAX_LISTED_REQUESTS = 512


class LoadReporter:
    """Builds snapshots on the engine thread; sends them from its own thread."""

    def __init__(self, settings: KVSettings, block_size: int) -> None:
        assert settings.control_address is not None
        self.instance_id = settings.instance_id
        self.incarnation = settings.incarnation
        self.block_size = block_size
        self._latest: LoadReport | None = None
        self._seq = 0
        self._keys: dict[str, str | None] = {}
        # Prefix-cache hits of the waiting requests, looked up once per stay in the queue.
        self._waiting_hits: dict[str, int] = {}
        self._last_step_at: float | None = None
        self._step_ms = 0.0
        self._prefill_rate = PrefillRateMeter(_EMA)
        self._preemptions = 0
        self._max_batched_tokens = 0
        # The step-time model's features: the last step's (timed at the next schedule()),
        # and the sums over every timed step so far.
        self._last_work = StepTotals()
        self._totals = StepTotals()
        self._pusher = PeriodicPusher(
            settings.control_address,
            cluster_secret(loopback_only=is_loopback(settings.host)),
            settings.report_interval_s,
            self._next_report,
            name="pdserve-load-reporter",
        )

    def _key_of(self, request: Request) -> str | None:
        if request.request_id not in self._keys:
            params = parse_params(request.kv_transfer_params)
            self._keys[request.request_id] = params.request_key if params else None
        return self._keys[request.request_id]

    def _queued_tokens(self, scheduler: Scheduler) -> int:
        """The waiting queue's tokens less each request's prefix-cache hit, looked up as it
        is first seen waiting. vLLM finds the hit only when it schedules a request, so
        counting whole prompts made an instance holding a hot prefix look busy by every
        queued request's cached part, and cache-aware dispatch spread the prefix early. The
        lookup is read-only (no reference taken, no statistics counted)."""
        manager = scheduler.kv_cache_manager
        hits: dict[str, int] = {}
        queued = 0
        for request in scheduler.waiting:
            hit = self._waiting_hits.get(request.request_id)
            if hit is None:
                hit = 0
                if request.block_hashes and manager.prefix_cache_lookup_enabled(request):
                    _, hit, _ = manager.coordinator.find_longest_cache_hit(
                        request.block_hashes, request.num_tokens - 1
                    )
            hits[request.request_id] = hit
            queued += request.num_tokens - max(request.num_computed_tokens, hit)
        self._waiting_hits = hits
        return queued

    def _time_step(self, busy: bool, work: StepTotals) -> None:
        """Times the previous step (from its schedule() to this one) and adds it to the
        averages and totals; an idle gap in between leaves that step untimed."""
        now = time.perf_counter()
        if self._last_step_at is not None and busy:
            dt = now - self._last_step_at
            self._step_ms += _EMA * (dt * 1e3 - self._step_ms)
            last = self._last_work
            self._prefill_rate.observe(last.prefill_tokens, last.decode_seqs, dt)
            self._totals = add_step(self._totals, last, dt)
        self._last_step_at = now if busy else None
        self._last_work = work

    def on_schedule(self, scheduler: Scheduler, output: SchedulerOutput) -> None:
        """Step timing and preemptions, from what ``schedule()`` decided."""
        self._max_batched_tokens = scheduler.max_num_scheduled_tokens
        work = step_work(scheduler.running, output.num_scheduled_tokens)
        self._time_step(output.total_num_scheduled_tokens > 0, work)
        self._preemptions += len(output.preempted_req_ids or ())

    def observe(self, scheduler: Scheduler, transfers: TransferCounters) -> None:
        """Snapshots the scheduler after a step (blocks freed in the step are free here)."""
        running = scheduler.running
        waiting = [*scheduler.waiting, *scheduler.kv_holding_waiting]
        listed = []
        for request in running[:MAX_LISTED_REQUESTS]:
            key = self._key_of(request)
            if key is not None:
                listed.append(
                    RunningRequest(
                        request_key=key,
                        num_tokens=request.num_tokens,
                        num_blocks=cdiv(request.num_tokens, self.block_size),
                        num_output_tokens=request.num_output_tokens,
                    )
                )
        live = {r.request_id for r in running} | {r.request_id for r in waiting}
        for req_id in [k for k in self._keys if k not in live]:
            del self._keys[req_id]
        pool = scheduler.kv_cache_manager.block_pool
        unfinished_prefill = sum(
            max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in running
        )
        decoding = [r for r in running if r.num_output_tokens > 0]
        self._latest = LoadReport(
            instance_id=self.instance_id,
            seq=0,
            num_running=len(running),
            num_waiting=len(waiting),
            num_loading=sum(1 for r in waiting if r.status == RequestStatus.WAITING_FOR_REMOTE_KVS),
            free_blocks=pool.get_num_free_blocks(),
            total_blocks=pool.num_gpu_blocks - 1,
            block_size=self.block_size,
            waiting_prompt_tokens=unfinished_prefill
            + self._queued_tokens(scheduler)
            + sum(r.num_tokens - r.num_computed_tokens for r in scheduler.kv_holding_waiting),
            # Only requests that hold no blocks yet want new ones: those in
            # kv_holding_waiting (KV being loaded, or a partial prefill) are already counted
            # as used in free_blocks, and counting them again hid free room from dispatch.
            waiting_blocks=sum(cdiv(r.num_tokens, self.block_size) for r in scheduler.waiting),
            step_ms=self._step_ms,
            prefill_tokens_per_s=self._prefill_rate.tokens_per_s,
            num_preemptions=self._preemptions,
            running=listed,
            transfers=transfers,
            incarnation=self.incarnation,
            num_decoding=len(decoding),
            decode_context_tokens=sum(r.num_tokens for r in decoding),
            max_num_batched_tokens=self._max_batched_tokens,
            totals=self._totals,
        )

    def _next_report(self) -> LoadReport | None:
        """The latest snapshot, numbered (reporter thread, every report interval)."""
        report = self._latest
        if report is None:
            return None
        self._seq += 1
        return msgspec.structs.replace(report, seq=self._seq)

    def stop(self) -> None:
        self._pusher.stop()


def step_work(running: list[Request], scheduled: dict[str, int]) -> StepTotals:
    """The features of the step ``schedule()`` just made (one pass over the running
    requests; their ``num_computed_tokens`` already count this step's tokens, as vLLM
    advances them in ``schedule()``). A decode is one token after every other computed
    token of a request with output; anything else is a prompt chunk."""
    prefill = decode = context = 0
    pairs = 0.0
    for request in running:
        count = scheduled.get(request.request_id, 0)
        if count <= 0:
            continue
        before = request.num_computed_tokens - count
        if count == 1 and request.num_output_tokens > 0 and before == request.num_tokens - 1:
            decode += 1
            context += before + 1
        else:
            prefill += count
            pairs += count * (before + count / 2)
    return StepTotals(
        steps=1,
        prefill_tokens=prefill,
        prefill_pairs=pairs,
        decode_seqs=decode,
        decode_context=context,
    )


def add_step(totals: StepTotals, step: StepTotals, seconds: float) -> StepTotals:
    """``totals`` plus one step of ``seconds`` that computed ``step``."""
    return StepTotals(
        steps=totals.steps + step.steps,
        seconds=totals.seconds + seconds,
        prefill_tokens=totals.prefill_tokens + step.prefill_tokens,
        prefill_pairs=totals.prefill_pairs + step.prefill_pairs,
        decode_seqs=totals.decode_seqs + step.decode_seqs,
        decode_context=totals.decode_context + step.decode_context,
    )


class PdserveScheduler(Scheduler):
    """vLLM's scheduler, plus a load report after every ``schedule()``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        transfer_config = self.vllm_config.kv_transfer_config
        extra = transfer_config.kv_connector_extra_config if transfer_config else None
        settings = from_extra_config(extra) if extra else None
        self.reporter: LoadReporter | None = None
        if settings is not None and settings.control_address:
            self.reporter = LoadReporter(settings, self.cache_config.block_size)
            self.reporter.observe(self, TransferCounters())
            logger.info(
                "pdserve: instance %s reports load to %s every %.0f ms",
                settings.instance_id,
                settings.control_address,
                settings.report_interval_s * 1e3,
            )

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        output = super().schedule(*args, **kwargs)
        if self.reporter is not None:
            self._guarded(self.reporter.on_schedule, self, output)
        return output

    def update_from_output(self, *args: Any, **kwargs: Any) -> Any:
        outputs = super().update_from_output(*args, **kwargs)
        if self.reporter is not None:
            counters = getattr(self.connector, "transfer_counters", None) or TransferCounters()
            self._guarded(self.reporter.observe, self, counters)
        return outputs

    @staticmethod
    def _guarded(function: Any, *args: Any) -> None:
        try:
            function(*args)
        except Exception:  # a load report must never stop the engine
            logger.exception("pdserve: load snapshot failed")

    def shutdown(self) -> None:
        if self.reporter is not None:
            self.reporter.stop()
        super().shutdown()
