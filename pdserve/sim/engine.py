"""One vLLM v1 engine, step by step: what its scheduler admits, computes, preempts and reports.

Each step follows ``vllm.v1.core.sched.scheduler.Scheduler.schedule`` (vLLM 0.32):

1. Running requests first, in order, each with as many tokens as it has left to compute
   (one for a decoding sequence, a prompt chunk otherwise), until the token budget
   (``max_num_batched_tokens``) is spent. A request whose new tokens need a block when none
   is free preempts the *last* running request (recompute: its blocks are freed, it goes back
   to the front of the waiting queue with nothing computed), again until the blocks fit or
   it preempted itself.
2. Only if nothing was preempted: waiting requests in order while budget, a running slot
   (``max_num_seqs``) and blocks last. A request finds its prefix in the prefix cache
   (``blocks.BlockPool``) and computes the rest, chunked to the budget left. A request whose
   KV comes from another instance gets blocks for its whole prompt and waits for the pull
   (``num_loading``); once pulled, it computes only its last prompt token, as pdserve's
   connector makes vLLM do, and samples its first output token.

A step takes ``profile.step_seconds`` of what it computes; a request whose computed tokens
reach its length samples a token at the step's end. A finished request frees its blocks,
unless it exports its KV (a prefill leg, or a live migration's pinned source): then they stay
until pulled or released.

Speed: a step in which every running request decodes and nothing can be admitted is followed
by more such steps until the first request finishes or the blocks run out, so such a run of
steps (an *epoch*) is computed at once, its step times in closed form, and its tokens are
handed out lazily: whenever anything looks at or changes the engine (``touch``), the steps
finished by then are applied. Anything that changes what the scheduler would decide (a new
request, a finished pull, an abort, freed blocks) ends the epoch after the step in flight.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence

import msgspec

from pdserve.kv.metadata import loads_synchronously
from pdserve.protocol.net import cdiv
from pdserve.protocol.reports import LoadReport, PrefillRateMeter
from pdserve.sim.epoch import Epoch, epoch_durations, epoch_ends, plan_epoch
from pdserve.sim.events import EventQueue
from pdserve.sim.holdings import EngineHoldings
from pdserve.sim.legs import EngineConfig, Leg, LegState
from pdserve.sim.profile import StepProfile, StepWork
from pdserve.sim.report import TransferCache, load_report

# As pdserve.instance.engine_scheduler: the weight of the moving averages.
EMA = 0.2
_NO_WORK = StepWork()
# An average of 0.2-weighted updates forgets all but this many of the last values (0.8^40).
_EMA_MEMORY = 40
_NO_STEPS: list[float] = []
# States of a leg whose blocks can be pulled (a pinned running leg exports live).
_EXPORTING = (LegState.EXPORTED, LegState.RUNNING)


class SimEngine(EngineHoldings):
    def __init__(
        self,
        instance_id: str,
        profile: StepProfile,
        config: EngineConfig,
        queue: EventQueue,
        incarnation: str = "",
        report_interval_s: float = 0.1,
        report_phase_s: float = 0.0,
        list_running: bool = True,
    ) -> None:
        """Reports are taken every ``report_interval_s`` from ``report_phase_s`` on;
        ``list_running`` False: they leave out the running requests (only rescheduling
        reads them)."""
        super().__init__(config)
        self.instance_id = instance_id
        self.profile = profile
        self.config = config
        self.queue = queue
        self.incarnation = incarnation
        self.alive = True
        self.running: list[Leg] = []
        self.ready: deque[Leg] = deque()
        # Insertion-ordered (dicts, not sets): a run must not depend on object addresses.
        self.loading: dict[Leg, None] = {}
        self.exported: dict[Leg, None] = {}
        self.step_ms = 0.0
        self.prefill_rate = PrefillRateMeter(EMA)
        self._busy = False
        self._wake_pending = False
        self._gen = 0  # step-end events of older generations are stale
        self._items: list[tuple[Leg, int]] = []
        self._step_end = 0.0
        self._step_seconds = 0.0
        self._step_work = _NO_WORK
        self._step_pull_s = 0.0  # synchronous pulls of the step being scheduled
        self._step_pulled: list[Leg] = []
        self._epoch: Epoch | None = None
        self.report_interval_s = report_interval_s
        self.report_phase_s = report_phase_s
        self.list_running = list_running
        self._captured_tick = -1
        self._next_capture_at = -math.inf
        # Bumped by every change of state, so an unchanged state reuses its last report.
        self._version = 0
        self._snapshot_state: tuple[int, int, bool] = (-1, 0, False)
        self._snapshot: LoadReport | None = None
        self.transfers = TransferCache()

    # --- what the cluster calls -------------------------------------------------------------

    def add(self, leg: Leg, now: float) -> None:
        """A new request reaches the engine (between steps, as vLLM's input queue)."""
        self.touch(now, interrupt=True)
        leg.engine = self
        leg.state = LegState.WAITING
        leg.arrival = now
        self._enqueue(leg)
        self._wake(now)

    def abort(self, leg: Leg, now: float) -> None:
        """The gateway closed the leg's stream: vLLM frees its blocks unless it is pinned."""
        self.touch(now, interrupt=True)
        state = leg.state
        if state is LegState.RUNNING:
            self.running.remove(leg)
        elif state is LegState.WAITING:
            self.waiting.remove(leg)
            self._unqueue(leg)
        elif state is LegState.READY:
            self.ready.remove(leg)
        elif state is LegState.LOADING:
            self.loading.pop(leg, None)
            self._stop_pull(leg)
        else:  # exported (released separately), finished or aborted: nothing runs
            return
        if leg.pinned and state is LegState.RUNNING:
            leg.state = LegState.EXPORTED
            self.exported[leg] = None
        else:
            self._free(leg)
            leg.state = LegState.ABORTED
        self._wake(now)

    def release(self, leg: Leg, now: float) -> None:
        """An export was pulled or is no longer wanted: its blocks are freed."""
        if leg not in self.exported:
            return
        self.touch(now, interrupt=True)
        self.exported.pop(leg, None)
        leg.pinned = False
        self._free(leg)
        leg.state = LegState.FINISHED
        self._wake(now)

    def unpin(self, leg: Leg, now: float) -> None:
        """A migration ended before its cut: a finished pinned leg frees its blocks."""
        leg.pinned = False
        if leg.state is LegState.EXPORTED and not leg.keep:
            self.release(leg, now)

    def pull_failed(self, leg: Leg, now: float) -> None:
        """The exporter of a loading leg went away: the leg is prefilled here instead."""
        if leg.state is not LegState.LOADING:
            return
        self.touch(now, interrupt=True)
        self.loading.pop(leg, None)
        self._free(leg)
        leg.source = None
        leg.num_computed = 0
        leg.state = LegState.WAITING
        self._enqueue(leg, front=True)
        self._wake(now)

    def fail(self, now: float) -> list[Leg]:
        """The instance dies: every leg it holds is lost (returned), nothing runs any more."""
        self.touch(now)
        self.alive = False
        self._gen += 1
        self._busy = False
        self._epoch = None
        legs = [*self.running, *self.waiting, *self.ready, *self.loading, *self.exported]
        for leg in self.loading:
            self._stop_pull(leg)
        for leg in legs:
            leg.state = LegState.ABORTED
        self.running, self.waiting, self.ready = [], deque(), deque()
        self.loading, self.exported = {}, {}
        return legs

    def touch(self, now: float, interrupt: bool = False) -> None:
        """Brings the engine to ``now`` before anything looks at or changes it: the load
        report of the last report time is taken first (the state has not changed since),
        then the epoch's steps finished by ``now`` are applied; with ``interrupt`` the
        epoch ends after the step in flight, so the next step is scheduled afresh."""
        if self.alive and now >= self._next_capture_at:
            self._capture(now)
        epoch = self._epoch
        if interrupt:
            self._version += 1
            if epoch is not None:
                epoch.intact = False  # the running requests may change
        if epoch is None:
            return
        self._advance(epoch, now)
        if interrupt and epoch.applied + 1 < epoch.last:
            epoch.last = epoch.applied + 1
            self._gen += 1
            self.queue.at(epoch.ends[epoch.last - 1], self._on_step_end, self._gen)

    def _advance(self, epoch: Epoch, now: float) -> None:
        done = bisect_right(epoch.ends, now, epoch.applied, epoch.last)
        if done > epoch.applied:
            self._apply(epoch, done)

    def next_token_at(self, leg: Leg) -> float | None:
        """When the step in flight ends, if it produces a token of ``leg``."""
        if leg.state is not LegState.RUNNING or not self._busy:
            return None
        epoch = self._epoch
        if epoch is not None:
            return epoch.ends[min(epoch.applied, epoch.last - 1)]
        for item, count in self._items:
            if item is leg:
                return self._step_end if leg.num_computed + count >= leg.num_tokens else None
        return None

    def sent(self, nbytes: int) -> None:
        """Another engine pulls ``nbytes`` of KV from this one (counted in its reports)."""
        self.touch(self.queue.now)
        self.counters.bytes_sent += nbytes
        self._version += 1

    def check(self) -> None:
        """Block accounting (tests): every used block is a leg's own or a cached run's."""
        holders = [*self.running, *self.loading, *self.ready, *self.exported]
        self.pool.check([leg.own_blocks for leg in holders] or [0])
        assert all(leg.own_blocks == 0 for leg in self.waiting), "a waiting leg holds blocks"

    def idle(self) -> bool:
        return not (self.running or self.waiting or self.ready or self.loading or self.exported)

    # --- the load report --------------------------------------------------------------------

    def latest_tick(self, now: float) -> int:
        """Index of the last report time at or before ``now`` (-1: none yet)."""
        if now < self.report_phase_s:
            return -1
        # Rounding must not put a report time (phase + tick * interval) before its tick.
        return math.floor((now - self.report_phase_s) / self.report_interval_s + 1e-9)

    def tick_time(self, tick: int) -> float:
        return self.report_phase_s + tick * self.report_interval_s

    def report_at(self, tick: int) -> LoadReport | None:
        """The report sent at report time ``tick`` (its ``seq`` is ``tick + 1``); only the
        latest one is kept, as a newer report supersedes it at the gateway anyway."""
        if tick > self._captured_tick:
            self._capture_tick(tick)  # latest_tick(tick_time(tick)) is tick
        snapshot = self._snapshot
        return snapshot if snapshot is not None and snapshot.seq == tick + 1 else None

    def _capture(self, now: float) -> None:
        if now < self._next_capture_at:
            return  # no report time passed since the last capture
        tick = self.latest_tick(now)
        if tick > self._captured_tick:
            self._capture_tick(tick)

    def _capture_tick(self, tick: int) -> None:
        epoch = self._epoch
        if epoch is None:
            ahead, in_flight, steps = 0, False, 0
        else:  # the epoch's steps by then, counted without applying them
            done = bisect_right(epoch.ends, self.tick_time(tick), epoch.applied, epoch.last)
            ahead, in_flight, steps = done - epoch.applied, done < epoch.last, done
        state = (self._version, steps, in_flight)
        snapshot = self._snapshot
        if snapshot is not None and state == self._snapshot_state:
            # Nothing changed since (an idle instance): the same report, numbered anew.
            self._snapshot = msgspec.structs.replace(snapshot, seq=tick + 1)
        else:
            self._snapshot = self.report(tick + 1, ahead, in_flight)
            self._snapshot_state = state
        self._captured_tick = tick
        # A little early rather than late: latest_tick decides, this only skips the call.
        self._next_capture_at = self.tick_time(tick + 1) - 1e-9 * self.report_interval_s

    def report(self, seq: int, ahead: int = 0, in_flight: bool = False) -> LoadReport:
        """This state's load report (``pdserve.sim.report.load_report``)."""
        return load_report(self, seq, ahead, in_flight, self._epoch)

    # --- pulls ------------------------------------------------------------------------------

    def _pull_blocks(self, leg: Leg) -> tuple[int, float]:
        """Blocks the leg pulls (whole blocks holding positions before its last token that
        its own cache lacks) and the seconds that takes; counted as received and sent."""
        source = leg.source
        assert source is not None
        bs = self.block_size
        end = min(cdiv(min(leg.source_tokens, leg.num_tokens - 1), bs), leg.covered_blocks)
        blocks = max(0, end - leg.hit_blocks)
        seconds = self.profile.transfer_seconds(blocks * bs)
        nbytes = blocks * bs * self.profile.kv_bytes_per_token
        self.counters.bytes_received += nbytes
        self.counters.load_seconds += seconds
        if source.engine is not None:
            source.engine.sent(nbytes)
        return blocks, seconds

    def _start_pull(self, leg: Leg, now: float) -> None:
        """The leg has its blocks: pull the KV its local cache did not have (the request
        waits, ``num_loading``, while the engine goes on with the others)."""
        source = leg.source
        assert source is not None
        leg.num_computed = leg.hit_blocks * self.block_size
        _, seconds = self._pull_blocks(leg)
        leg.state = LegState.LOADING
        leg.pull_gen += 1
        self.loading[leg] = None
        source.pullers.append(leg)
        self.queue.at(now + seconds, self._on_pulled, (leg, leg.pull_gen))

    def _pull_in_step(self, leg: Leg) -> None:
        """A synchronous pull: the step in the making waits for it, then computes the
        leg's last token; its owner hears of the pull when the step ends."""
        _, seconds = self._pull_blocks(leg)
        self._step_pull_s += seconds
        self._step_pulled.append(leg)
        leg.num_computed = max(leg.num_computed, min(leg.source_tokens, leg.num_tokens - 1))
        leg.source = None
        leg.state = LegState.RUNNING
        self.counters.loads_ok += 1

    def _stop_pull(self, leg: Leg) -> None:
        leg.pull_gen += 1
        if leg.source is not None and leg in leg.source.pullers:
            leg.source.pullers.remove(leg)

    def _on_pulled(self, arg: tuple[Leg, int]) -> None:
        leg, gen = arg
        if gen != leg.pull_gen or leg.state is not LegState.LOADING or not self.alive:
            return
        now = self.queue.now
        self.touch(now, interrupt=True)
        self._stop_pull(leg)
        self.loading.pop(leg, None)
        leg.num_computed = max(leg.num_computed, min(leg.source_tokens, leg.num_tokens - 1))
        leg.source = None
        self._adopt(leg)
        leg.state = LegState.READY
        self.ready.append(leg)
        self.counters.loads_ok += 1
        leg.owner.leg_pulled(leg, now)
        self._wake(now)

    # --- scheduling -------------------------------------------------------------------------

    def _wake(self, now: float) -> None:
        if not self._busy and not self._wake_pending and self.alive:
            self._wake_pending = True
            self.queue.at(now, self._on_wake)

    def _on_wake(self, _: object) -> None:
        self._wake_pending = False
        if not self._busy and self.alive:
            self.touch(self.queue.now)
            self._start_step(self.queue.now)

    def _schedule(self, now: float) -> tuple[list[tuple[Leg, int]], bool]:
        """One ``Scheduler.schedule``: the step's (leg, new tokens), and whether it can be
        the first of an epoch (every running leg decodes, nobody was admitted or
        preempted)."""
        bs = self.block_size
        pool = self.pool
        budget = self.config.max_num_batched_tokens
        running = self.running
        items: list[tuple[Leg, int]] = []
        preempted = False
        decode_only = True
        i = 0
        while i < len(running) and budget > 0:
            leg = running[i]
            computed = leg.num_computed
            count = leg.prompt_tokens + leg.num_output - computed  # leg.num_tokens - computed
            if count > budget:  # noqa: PLR1730 (cheaper than a call)
                count = budget
            new = -(-(computed + count) // bs) - leg.own_blocks - leg.hit_blocks
            if new > 0:
                while not pool.allocate(new):
                    victim, budget, i = self._victim(items, budget, i)
                    self._preempt(victim)
                    preempted = True
                    if victim is leg:
                        break
                if leg.state is not LegState.RUNNING:
                    break
                leg.own_blocks += new
            if count != 1 or leg.num_output == 0:
                decode_only = False
            items.append((leg, count))
            budget -= count
            i += 1
        if preempted:
            return items, False
        whole = len(items) == len(running)
        admitted = self._admit(items, budget, now)
        return items, decode_only and whole and not admitted

    def _victim(self, items: list[tuple[Leg, int]], budget: int, i: int) -> tuple[Leg, int, int]:
        """The running leg a step preempts, taken out of ``running``, with the step's budget
        and the scheduling loop's index after it: the last one (FCFS), or under priority
        scheduling the lowest priority's latest arrival, which may be scheduled already in
        this step (its tokens are then given back, as vLLM does)."""
        running = self.running
        if not self.by_priority:
            return running.pop(), budget, i
        victim = max(running, key=lambda leg: leg.schedule_key)
        index = running.index(victim)
        del running[index]
        if index < i:
            i -= 1
            for j, (scheduled, count) in enumerate(items):
                if scheduled is victim:
                    del items[j]
                    budget += count
                    break
        return victim, budget, i

    def _admit(self, items: list[tuple[Leg, int]], budget: int, now: float) -> bool:
        """Waiting legs, pulled ones first, while budget, slots and blocks last."""
        bs = self.block_size
        running = self.running
        max_seqs = self.config.max_num_seqs
        admitted = False
        while self.ready and budget > 0 and len(running) < max_seqs:
            leg = self.ready[0]
            count = min(leg.num_tokens - leg.num_computed, budget)
            new = cdiv(leg.num_computed + count, bs) - leg.covered_blocks
            if new > 0 and not self.pool.allocate(new):
                break
            leg.own_blocks += max(new, 0)
            self.ready.popleft()
            leg.state = LegState.RUNNING
            running.append(leg)
            items.append((leg, count))
            budget -= count
            admitted = True
        while self.waiting and budget > 0 and len(running) < max_seqs:
            leg = self.waiting[0]
            tokens = leg.num_tokens
            found, hit = self._prefix_hit(leg)
            if leg.source is not None and leg.source.state not in _EXPORTING:
                leg.source = None  # its exporter is gone: prefilled here
            if leg.source is not None:
                if not self._take(leg, found, cdiv(tokens, bs) - hit):
                    break
                self._dequeue()
                self._looked_up(tokens, hit)
                if loads_synchronously(
                    tokens - hit * bs, hit * bs, bs, self.config.sync_load_max_tokens
                ):
                    # A small load (a migration's tail) runs in this step, before its
                    # forward, which computes the last token (the connector's sync load).
                    self._pull_in_step(leg)
                    running.append(leg)
                    items.append((leg, 1))
                    budget -= 1
                    admitted = True
                else:
                    self._start_pull(leg, now)
                continue
            count = min(tokens - hit * bs, budget)
            if not self._take(leg, found, cdiv(hit * bs + count, bs) - hit):
                break
            self._dequeue()
            self._looked_up(tokens, hit)
            leg.num_computed = hit * bs
            leg.state = LegState.RUNNING
            running.append(leg)
            items.append((leg, count))
            budget -= count
            admitted = True
        return admitted

    def _start_step(self, now: float) -> None:
        self._version += 1
        items, epoch_ok = self._schedule(now)
        while not items and self.running:
            # Under priority scheduling the step's first request preempted itself, which
            # ends vLLM's pass with nothing scheduled; its next pass schedules the others.
            items, epoch_ok = self._schedule(now)
        if not items:
            self._busy = False
            self._items = []
            return
        self._busy = True
        self._gen += 1
        if epoch_ok and self.config.epochs:
            steps, firsts = plan_epoch(self.running, self.pool.free, self.block_size)
            if steps > 1:
                self._start_epoch(now, steps, firsts)
                return
        self._items = items
        work = self._work(items)
        self._step_work = work
        self._step_seconds = self.profile.step_seconds(work) + self._step_pull_s
        self._step_pull_s = 0.0
        self._step_end = now + self._step_seconds
        self.queue.at(self._step_end, self._on_step_end, self._gen)

    def _work(self, items: Sequence[tuple[Leg, int]]) -> StepWork:
        prefill = 0
        attention = 0.0
        seqs = 0
        context = 0
        for leg, count in items:
            if count == 1 and leg.num_output > 0 and leg.num_computed == leg.num_tokens - 1:
                seqs += 1
                context += leg.num_computed + 1
            else:
                prefill += count
                attention += count * (leg.num_computed + count / 2)
        return StepWork(prefill, attention, seqs, context)

    def _on_step_end(self, gen: int) -> None:
        if gen != self._gen or not self.alive:
            return
        now = self.queue.now
        self.touch(now)
        self._version += 1
        epoch = self._epoch
        finished: list[Leg] = []
        if epoch is not None:
            if epoch.applied < epoch.last:
                self._apply(epoch, epoch.last)
            self._epoch = None
            finished = [leg for leg in self.running if leg.num_output >= leg.max_tokens]
        else:
            finished = self._apply_step(now)
        pulled, self._step_pulled = self._step_pulled, []
        self._items = []
        self._busy = False
        for leg in pulled:
            leg.owner.leg_pulled(leg, now)
        if finished:
            done = set(finished)
            self.running = [leg for leg in self.running if leg not in done]
            for leg in finished:
                self._finish(leg)
            for leg in finished:
                leg.owner.leg_finished(leg, now)
        if not self._busy and self.alive:
            self._start_step(now)

    def _apply_step(self, now: float) -> list[Leg]:
        self._count_step(self._step_seconds, self._step_work)
        finished = []
        for leg, count in self._items:
            if leg.state is not LegState.RUNNING:
                continue
            leg.num_computed += count
            if leg.adopted < len(leg.chain):
                self._adopt(leg)
            if leg.num_computed >= leg.num_tokens:
                leg.num_output += 1
                leg.owner.leg_tokens(leg, now, now, _NO_STEPS, 0, 1)
                if leg.num_output >= leg.max_tokens:
                    finished.append(leg)
        return finished

    def _finish(self, leg: Leg) -> None:
        if leg.keep or leg.pinned:
            leg.state = LegState.EXPORTED
            self.exported[leg] = None
        else:
            self._free(leg)
            leg.state = LegState.FINISHED

    def _count_step(self, seconds: float, work: StepWork) -> None:
        c = self.counters
        c.steps += 1
        c.busy_s += seconds
        prefill_tokens = work.prefill_tokens
        c.prefill_tokens += prefill_tokens
        c.prefill_pairs += work.prefill_attention
        c.decode_seqs += work.decode_seqs
        c.decode_context += work.decode_context_tokens
        self.step_ms += EMA * (seconds * 1e3 - self.step_ms)
        self.prefill_rate.observe(prefill_tokens, work.decode_seqs, seconds)

    # --- epochs -----------------------------------------------------------------------------

    def _start_epoch(self, now: float, steps: int, firsts: list[int]) -> None:
        running = self.running
        context = tokens = 0
        decoding = True  # output and the prompt computed, as every request of an epoch has
        for leg in running:
            computed = leg.num_computed
            context += computed + 1
            tokens += leg.prompt_tokens + leg.num_output
            if not leg.num_output or computed < leg.prompt_tokens:
                decoding = False
        durations = epoch_durations(self.profile, len(running), context, steps)
        ends = epoch_ends(now, durations)
        epoch = self._epoch = Epoch(ends=ends, steps=durations, last=steps)
        if decoding:  # what reports need (``Epoch``): they count these as decoding
            epoch.intact = True
            epoch.seqs = len(running)
            epoch.tokens = tokens
            epoch.context = context
            epoch.plan_blocks(firsts, self.block_size)
        self.queue.at(ends[-1], self._on_step_end, self._gen)

    def _apply(self, epoch: Epoch, done: int) -> None:
        """Applies epoch steps ``epoch.applied`` .. ``done`` - 1 to every running leg."""
        lo = epoch.applied
        count = done - lo
        first_at, last_at = epoch.ends[lo], epoch.ends[done - 1]
        steps = epoch.steps
        in_flight = done < epoch.last
        bs = self.block_size
        pool = self.pool
        c = self.counters
        seqs = len(self.running)
        if epoch.intact:  # the same sum, from the start's
            context = epoch.context + seqs * lo
        else:
            context = sum(leg.num_computed + 1 for leg in self.running)  # at step ``lo``
        c.decode_seqs += seqs * count
        c.decode_context += context * count + seqs * count * (count - 1) // 2
        if in_flight and epoch.intact and epoch.blocks_by(done + 1) == epoch.allocated:
            in_flight = False  # the step in flight needs no new block (see ``Epoch``)
        for leg in self.running:
            leg.num_computed += count
            leg.num_output += count
            leg.owner.leg_tokens(leg, first_at, last_at, steps, lo, done)
            if in_flight:
                new = -(-(leg.num_computed + 1) // bs) - leg.own_blocks - leg.hit_blocks
                if new > 0:
                    allocated = pool.allocate(new)
                    assert allocated, "an epoch ran out of blocks"
                    leg.own_blocks += new
                    epoch.allocated += new
        epoch.applied = done
        c.steps += count
        c.busy_s += last_at - (first_at - steps[lo])
        # Only the last updates matter: older values weigh less than 0.8^40 after them.
        for seconds in steps[max(lo, done - _EMA_MEMORY) : done]:
            self.step_ms += EMA * (seconds * 1e3 - self.step_ms)
