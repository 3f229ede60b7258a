"""Adaptive PD: every instance may prefill or decode; each request is placed against the SLOs.

Roles are preferences here: every usable instance (``prefill``, ``decode`` or ``both``) is a
candidate for a request's prefill and for its decode. Per request the policy predicts, from
the load reports and the step-time model fitted online from them
(``pdserve.scheduler.step_model``, the simulator's model family):

- **TTFT** of prefilling it on instance *i*: the prompt tokens queued there plus its own,
  computed in steps of the instance's token budget while *i*'s running decodes ride along
  in every step (their interference), plus one step of the decode instance for the first
  token when prefill and decode differ (the KV pull is ignored: at the profiles' link speeds
  a prompt moves in ~1% of a TTFT objective);
- **TPOT** of decoding it on instance *d*: one decode step of *d*'s batch with this request
  added, at its mid-life context (prompt + half its output), plus *d*'s queued prompt
  tokens spread over the request's output tokens (prefill steps stall every decode there).

**Pending decodes.** A disaggregated request's decode share is held on its decode instance
until its prefill ends (``ControlPlane.place``), so the snapshot's pending requests include
decodes that start only after the prompts queued ahead of them. Counted whole, a prefill
backlog of W seconds makes every decoder look W x rate sequences fuller than it will be;
it then refuses prompts, which go to the backlog, which grows: the collapse of
``benchmark/results/sim-adaptive-8`` without rescheduling (seed 1 at 5 req/s: the policy saw
228 decoding sequences where 33 ran; KV was never short: >5000 of 5867 blocks free, no
preemption). So each instance has two batches. *Now*: the decodes of its last report, what
a prompt computed there now stalls and what a migration joins. *Later*: what a decode
dispatched now joins when it starts, one backlog wait W (the token-weighted mean wait of the
queued prompts) from now: the pending requests by ``pending_weight``, a decode lifetime L
(mean output x TPOT objective) over W, at most 1 (Little's law: of requests landing over W,
those alive in one lifetime), plus the running ones by ``running_weight``, 1 - W/L, at
least 0 (those that have not ended by then). Counting the running ones whole as well
made the decoders of a backlogged cluster look full twice over: with rescheduling, SLO
attainment at 6 req/s was 0.31 (mean of seeds 0-3), 0.65 with the later batch.

Decisions (each rule has a unit test in ``tests/unit/test_adaptive.py``):

1. **Decode: bin-packing below a bound.** The request decodes on the instance that already
   decodes and whose predicted TPOT is the *highest* still at or under the *pack bound*, so
   that decodes gather on few instances and the others stay free for prefill. The bound is
   the TPOT objective less the *prefill headroom*: one mean prompt's prefill spread over the
   mean output (both measured over the requests seen), the room a packed instance keeps to
   absorb one colocated prompt or migrated-in request per request lifetime without breaking
   the SLO; never below half the objective (a prompt costing more than half the budget of
   every output token is not worth colocating, so no room is kept for it). Only when no
   decoding instance fits does an idle one start decoding: ``decode`` role first, then
   ``both``, then ``prefill``, the one with the shortest prefill queue among them. If none
   fits at all, the lowest predicted TPOT.
   **Draining by dispatch**: while the cluster is *prefill-starved* (no instance without
   decodes can prefill the request within the TTFT objective), the decoding instance with
   the fewest decodes gets no new ones (the others take them, over the bound if they must),
   so that it empties within a decode lifetime and prefills: without it, a cluster in which
   every instance both decodes and prefills stays so, each one's predicted TPOT over the
   bound (seed 2 at 5.5 req/s: SLO attainment 0.28, TPOT mean 71 ms; 0.40 with it,
   0.71 against 0.57 over seeds 0-3). Rescheduling's consolidation does the same by
   migration, at once.
2. **Prefill: on instances without decodes.** Of the instances whose predicted TTFT meets the
   objective, one that runs no decodes (the shortest TTFT among them); only if none does,
   the one with the shortest TTFT whose decodes stay within the TPOT objective with the
   prompt's stall added (spread over their mean remaining output: half the mean output),
   the decode instance itself included (colocation). If nothing meets both: the idle
   instance with the shortest TTFT; with none idle, the shortest TTFT among those that
   meet the TTFT objective (a request that keeps its first token can still meet its SLOs;
   sending it to the batch it stalls least instead met them for 0.82 of requests, not
   0.97, in the simulator at 8 instances, 5 req/s, seed 3); and where none meets it (the
   request is lost either way) the instance whose batch the prompt stalls least, not the
   shortest TTFT, which is then the busiest decoder itself (colocated, no first decode
   step to wait for). Prefill on the decode instance is colocated (one leg), anywhere
   else disaggregated.
3. **Short prompts colocate**: a prompt whose own work (its tokens and attention pairs,
   ``StepModel.prompt_s``) costs no more than the fixed cost of one step (``base_s``) is
   computed in the decode instance's next step: a separate prefill leg and
   its pull would cost more than they save.
4. **Priority** (``RequestEstimate.priority > 0``): headroom instead of packing: the decode
   goes to the decoding instance with the *lowest* predicted TPOT (if even that one is over
   the bound, to the lowest of all, usually an idle instance), the prefill to the shortest
   TTFT whether or not the instance decodes, as long as its decodes stay within the TPOT
   objective with the prompt's stall added (rule 2 without its first branch). Sending it
   to the shortest TTFT anywhere met the high class's goal in the simulator but cost the
   normal class 2-3x its P99 TTFT: each prompt stalls a batch, more instances end up
   decoding, and fewer prefill (``benchmark/results/sim-priority-8``).
5. **SLOs**: the request's own objectives, else the cluster's (``SloSettings``); without a
   TPOT objective the bound is twice the step of a lone sequence (a batch may halve each
   sequence's speed); without a TTFT objective every TTFT meets it.

Rescheduling (``plan_adaptive``, run by both migrators every ``--reschedule-interval-s``):

- **mitigate**: an instance whose predicted TPOT (its batch plus its queued prefill spread
  over half the mean output) exceeds the objective, or that preempted since the last round,
  sheds its cheapest decodes (fewest blocks) to the instances that take them as dispatch
  would (the tightest fit under the bound, else an idle one), until it is under the bound;
- **consolidate**: while some instance's prefill queue would miss the TTFT objective, the
  instance with the fewest decodes whose decodes all fit elsewhere under the bound is
  emptied, so that it can prefill; a *role flip* priced in tokens: the KV tokens its live
  decodes move must be fewer than the queued prompt tokens past the objective that it will
  then take (a moved token costs a transfer, a queued one a miss); the value of its prefix
  cache is not priced (no report carries it yet).
"""

from __future__ import annotations

import enum
import math
from collections import Counter, deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from pdserve.protocol.reports import Role
from pdserve.scheduler.rescheduling import MigrationPlan
from pdserve.scheduler.slo import SloSettings
from pdserve.scheduler.snapshot import ClusterSnapshot, InstanceView, RequestEstimate
from pdserve.scheduler.step_model import StepFit, StepModel

# Which idle instance starts decoding first: what each role was launched for.
_DECODE_PREFERENCE: dict[Role, int] = {"decode": 0, "both": 1, "prefill": 2}
# Weight of one request in the running means of prompt and output lengths: the mean over
# about the last 100 requests, enough to be stable, short enough to follow a changing mix.
_MEAN_WEIGHT = 0.01
# Decisions ``describe`` lists (the latest ones): enough to see a run's pattern, bounded.
RECENT_DECISIONS = 32


class DecodeRule(enum.StrEnum):
    """Which branch of rule 1 (or 4) chose the decode instance."""

    PACKED = "packed"  # the fullest decoder at or under the pack bound
    OPENED = "opened"  # no decoder fitted: an idle instance starts decoding
    OVER_BOUND = "over-bound"  # nothing fits: the lowest predicted TPOT
    DRAINING = "draining"  # prefill-starved: not the lightest decoder, over the bound
    PRIORITY = "priority"  # rule 4: the lightest decoder (or the lowest TPOT of all)


class PrefillRule(enum.StrEnum):
    """Which branch of rules 2 and 3 chose the prefill instance."""

    SHORT = "short"  # rule 3: cheaper than a step's fixed cost, colocated
    FREE = "free"  # meets the TTFT objective and runs no decodes
    TOLERABLE = "tolerable"  # meets it, its decodes stay within the TPOT objective
    MISSED = "missed"  # nothing meets both: the shortest TTFT of the idle ones


@dataclass(frozen=True)
class Decision:
    """One placement as ``describe`` shows it: what was chosen, why, and the predictions
    the choice read (seconds)."""

    prompt_tokens: int
    max_tokens: int
    priority: int
    decode: str
    decode_rule: DecodeRule
    tpot_s: float
    pack_bound_s: float
    prefill: str
    prefill_rule: PrefillRule
    ttft_s: float


@dataclass(frozen=True)
class Placement:
    """``prefill`` None: ``decode`` serves the whole request (colocated)."""

    decode: str
    prefill: str | None = None


@dataclass(frozen=True)
class Load:
    """One instance as the predictions see it (reports plus pending work)."""

    view: InstanceView
    seqs: int  # sequences decoding (or loading their KV) at the last report
    context: int  # their context tokens
    queued: int  # prompt tokens not computed yet
    chunk: int  # the engine's token budget per step (0: unknown)
    rate: float  # measured prefill tokens/s (the fallback of an unfitted model)
    share: float = 0.0  # recent fraction of busy time spent prefilling (``prefill_share``)
    # (seqs, context) of the batch a decode dispatched now joins when it starts, after
    # the prefill backlog's wait (module docstring, "pending decodes"); None: as now.
    later: tuple[int, int] | None = None

    @property
    def decoding(self) -> bool:
        load = self.view.load
        return load is not None and load.num_decoding > 0


def _with_later(load: Load, pending_weight: float, running_weight: float) -> Load:
    """``load`` with its later batch: its pending requests (and their context) counted
    ``pending_weight`` times, its running ones ``running_weight`` times."""
    pending, block_size = load.view.pending, load.view.block_size
    seqs = running_weight * load.seqs + pending_weight * pending.requests
    context = running_weight * load.context + pending_weight * pending.blocks * block_size
    return replace(load, later=(round(seqs), round(context)))


class AdaptivePolicy:
    """The placement and rescheduling rules of the module docstring."""

    def __init__(self, slo: SloSettings, default_prefill_tokens_per_s: float) -> None:
        self.slo = slo
        self.default_rate = default_prefill_tokens_per_s
        self.fit = StepFit()
        self.mean_prompt = 0.0
        self.mean_output = 0.0
        self.recent: deque[Decision] = deque(maxlen=RECENT_DECISIONS)
        self.rule_counts: Counter[tuple[DecodeRule, PrefillRule]] = Counter()

    # --- what the predictions read ------------------------------------------------------------

    def loads(self, snapshot: ClusterSnapshot) -> list[Load]:
        """Every usable instance, its totals fed to the step-time fit on the way, with its
        later batch (``pending_weight``, ``running_weight``)."""
        out = []
        for view in snapshot.usable():
            load = view.load
            assert load is not None
            self.fit.observe(view.instance_id, load.totals)
            rate = load.prefill_tokens_per_s or self.default_rate
            out.append(
                Load(
                    view=view,
                    seqs=load.num_decoding + load.num_loading,
                    context=load.decode_context_tokens,
                    queued=view.queued_prompt_tokens(),
                    chunk=load.max_num_batched_tokens,
                    rate=rate,
                    share=self.fit.prefill_share(view.instance_id, rate),
                )
            )
        pending, running = self._later_weights(self.backlog_wait_s(out))
        return [_with_later(load, pending, running) for load in out]

    def pending_weight(self, loads: Sequence[Load]) -> float:
        """How many of the requests sent to an instance and not decoding there yet count in
        the batch a new decode joins (module docstring, "pending decodes"): a decode
        lifetime over the mean wait of the queued prompts they wait behind, at most 1."""
        return self._later_weights(self.backlog_wait_s(loads))[0]

    def running_weight(self, loads: Sequence[Load]) -> float:
        """How many of the decodes running now still run when a new decode starts, after
        the backlog's wait: 1 less the wait over a decode lifetime, at least 0 (module
        docstring, "pending decodes")."""
        return self._later_weights(self.backlog_wait_s(loads))[1]

    def _later_weights(self, wait: float) -> tuple[float, float]:
        """(pending, running) weights of the later batch after a backlog wait of ``wait``."""
        lifetime = self.lifetime_s()
        if lifetime <= 0:
            return 1.0, 1.0
        return min(1.0, lifetime / wait) if wait > 0 else 1.0, max(0.0, 1.0 - wait / lifetime)

    def backlog_wait_s(self, loads: Sequence[Load]) -> float:
        """The token-weighted mean wait of the queued prompts (0: none queued, or nothing
        learnt yet): how long after its dispatch a disaggregated request starts decoding."""
        queued = sum(load.queued for load in loads)
        if queued <= 0 or self.mean_output <= 0:
            return 0.0
        prompt = max(1, int(self.mean_prompt))
        waited = sum(load.queued * self.prefill_s(load, load.queued, prompt) for load in loads)
        return waited / queued

    def lifetime_s(self) -> float:
        """A mean request's decode at the TPOT objective: the longest a decode that meets
        its SLO runs (the horizon of ``pending_weight``)."""
        mean = RequestEstimate(max(1, int(self.mean_prompt)), max(1, int(self.mean_output)))
        return self.mean_output * self.tpot_objective_s(mean, ())

    @property
    def model(self) -> StepModel:
        return self.fit.model()

    def _learn(self, request: RequestEstimate) -> None:
        if self.mean_output <= 0:
            self.mean_prompt, self.mean_output = request.prompt_tokens, request.max_tokens
            return
        self.mean_prompt += _MEAN_WEIGHT * (request.prompt_tokens - self.mean_prompt)
        self.mean_output += _MEAN_WEIGHT * (request.max_tokens - self.mean_output)

    # --- predictions --------------------------------------------------------------------------

    def prefill_s(self, load: Load, tokens: int, prompt: int) -> float:
        """Time to compute ``tokens`` prompt tokens there (the queue ahead included), its
        decodes riding along; queued prompts' attention as if each were like ``prompt``."""
        pairs = tokens * max(prompt, 1) / 2
        return self.model.prefill_s(tokens, pairs, load.chunk, (load.seqs, load.context), load.rate)

    def step_s(
        self, load: Load, extra_seqs: int = 0, extra_context: int = 0, later: bool = False
    ) -> float:
        """A decode step there (``later``: with the batch a decode dispatched now starts
        in), stretched by the instance's recent prefill share (its decodes advance only in
        the time its prompts leave them)."""
        seqs, context = load.later if later and load.later else (load.seqs, load.context)
        seqs, context = seqs + extra_seqs, context + extra_context
        return self.model.decode_step_s(seqs, context, load.rate) / (1.0 - load.share)

    def ttft_s(self, prefill: Load, decode: Load, request: RequestEstimate) -> float:
        wait = self.prefill_s(
            prefill, prefill.queued + request.prompt_tokens, request.prompt_tokens
        )
        if prefill is decode:
            return wait
        return wait + self.step_s(decode, 1, request.prompt_tokens)

    def tpot_s(self, load: Load, request: RequestEstimate) -> float:
        """Predicted TPOT of ``request`` decoding there (see the module docstring)."""
        mid_life = request.prompt_tokens + request.max_tokens // 2
        stall = self.prefill_s(load, load.queued, request.prompt_tokens) if load.queued else 0.0
        return self.step_s(load, 1, mid_life, later=True) + stall / max(1, request.max_tokens)

    def batch_tpot_s(self, load: Load, stall_tokens: int = 0) -> float:
        """Predicted TPOT of the decodes running there, with ``stall_tokens`` more prompt
        tokens queued: every queued prompt stalls them, spread over their mean remaining
        output (half the mean output)."""
        tokens = load.queued + stall_tokens
        stall = self.prefill_s(load, tokens, int(self.mean_prompt)) if tokens else 0.0
        return self.step_s(load) + stall / max(1.0, self.mean_output / 2)

    # --- the objectives -----------------------------------------------------------------------

    def tpot_objective_s(self, request: RequestEstimate, loads: Sequence[Load]) -> float:
        objective = self.slo.tpot_s(request)
        if objective is not None:
            return objective
        rate = loads[0].rate if loads else self.default_rate
        return 2 * self.model.decode_step_s(1, request.prompt_tokens, rate)

    def pack_bound_s(self, objective: float, loads: Sequence[Load]) -> float:
        """The TPOT objective less the prefill headroom (module docstring, rule 1)."""
        if not loads or self.mean_output <= 0:
            return objective
        prompt = int(self.mean_prompt)
        headroom = self.prefill_s(loads[0], prompt, prompt) / self.mean_output
        return max(objective - headroom, objective / 2)

    # --- dispatch -----------------------------------------------------------------------------

    def place(self, snapshot: ClusterSnapshot, request: RequestEstimate) -> Placement | None:
        """Where the request's decode and prefill run; None: no usable instance."""
        loads = self.loads(snapshot)
        if not loads:
            return None
        self._learn(request)
        objective = self.tpot_objective_s(request, loads)
        bound = self.pack_bound_s(objective, loads)
        tpot = {id(load): self.tpot_s(load, request) for load in loads}
        decode, decode_rule = self.choose_decode(loads, request, tpot, bound)
        prefill, prefill_rule = self.choose_prefill(loads, decode, request)
        self._record(request, decode, decode_rule, tpot[id(decode)], bound, prefill, prefill_rule)
        if prefill is decode:
            return Placement(decode.view.instance_id)
        return Placement(decode.view.instance_id, prefill.view.instance_id)

    def choose_decode(
        self,
        loads: Sequence[Load],
        request: RequestEstimate,
        tpot: Mapping[int, float],
        bound: float,
    ) -> tuple[Load, DecodeRule]:
        """Rules 1 and 4; ``tpot``: each load's predicted TPOT by ``id``."""
        decoders = [load for load in loads if load.decoding]
        idle = [load for load in loads if not load.decoding]
        fits = [load for load in decoders if tpot[id(load)] <= bound]
        if request.priority > 0:
            lightest = min(decoders, key=lambda load: tpot[id(load)], default=None)
            if lightest is not None and tpot[id(lightest)] <= bound:
                return lightest, DecodeRule.PRIORITY
            return min(loads, key=lambda load: tpot[id(load)]), DecodeRule.PRIORITY
        draining = len(decoders) > 1 and self.prefill_starved(idle, request)
        if draining:  # rule 1, draining by dispatch: the lightest decoder gets none
            drain = min(decoders, key=lambda load: (load.seqs, load.context))
            decoders = [load for load in decoders if load is not drain]
            fits = [load for load in decoders if tpot[id(load)] <= bound]
        if fits:
            return max(fits, key=lambda load: (tpot[id(load)], load.seqs)), DecodeRule.PACKED
        if draining:
            return min(decoders, key=lambda load: tpot[id(load)]), DecodeRule.DRAINING
        fresh = [load for load in idle if tpot[id(load)] <= bound]
        if fresh:
            return min(fresh, key=self._opening_key), DecodeRule.OPENED
        return min(loads, key=lambda load: tpot[id(load)]), DecodeRule.OVER_BOUND

    def prefill_starved(self, idle: Sequence[Load], request: RequestEstimate) -> bool:
        """No instance without decodes prefills ``request`` within the TTFT objective."""
        objective = self.slo.ttft_s(request)
        if objective is None:
            return False
        prompt = request.prompt_tokens
        return all(self.prefill_s(load, load.queued + prompt, prompt) > objective for load in idle)

    @staticmethod
    def _opening_key(load: Load) -> tuple[int, int]:
        return _DECODE_PREFERENCE[load.view.role], load.queued

    def choose_prefill(
        self, loads: Sequence[Load], decode: Load, request: RequestEstimate
    ) -> tuple[Load, PrefillRule]:
        """Rules 2 and 3 (and 4's prefill)."""
        prompt = request.prompt_tokens
        if self.model.prompt_s(prompt, prompt * prompt / 2, decode.rate) <= self.model.base_s:
            return decode, PrefillRule.SHORT
        objective = self.slo.ttft_s(request)
        limit = math.inf if objective is None else objective
        tpot_limit = self.tpot_objective_s(request, loads)
        ttft = {id(load): self.ttft_s(load, decode, request) for load in loads}
        meets = [load for load in loads if ttft[id(load)] <= limit]
        free = [load for load in meets if not load.decoding]
        if free and request.priority <= 0:
            return min(free, key=lambda load: ttft[id(load)]), PrefillRule.FREE
        tolerable = [
            load
            for load in meets
            if not load.decoding or self.batch_tpot_s(load, request.prompt_tokens) <= tpot_limit
        ]
        if tolerable:
            return min(tolerable, key=lambda load: ttft[id(load)]), PrefillRule.TOLERABLE
        # Nothing meets both: miss this request's TTFT rather than every TPOT of a batch.
        idle = [load for load in loads if not load.decoding]
        if idle:
            return min(idle, key=lambda load: ttft[id(load)]), PrefillRule.MISSED
        if meets:
            return min(meets, key=lambda load: ttft[id(load)]), PrefillRule.MISSED
        stalled = {id(load): self.batch_tpot_s(load, request.prompt_tokens) for load in loads}
        return min(loads, key=lambda load: stalled[id(load)]), PrefillRule.MISSED

    # --- what the policy learnt and did (``GET /admin/policy``) -------------------------------

    def _record(
        self,
        request: RequestEstimate,
        decode: Load,
        decode_rule: DecodeRule,
        tpot: float,
        bound: float,
        prefill: Load,
        prefill_rule: PrefillRule,
    ) -> None:
        self.rule_counts[decode_rule, prefill_rule] += 1
        self.recent.append(
            Decision(
                request.prompt_tokens,
                request.max_tokens,
                request.priority,
                decode.view.instance_id,
                decode_rule,
                tpot,
                bound,
                prefill.view.instance_id,
                prefill_rule,
                self.ttft_s(prefill, decode, request),
            )
        )

    def describe(self, snapshot: ClusterSnapshot) -> dict[str, Any]:
        """The fitted step model, the running means, each instance's predictions now, how
        often each (decode, prefill) rule decided and the latest decisions: what an operator
        (or a test) reads to see why the policy places as it does."""
        loads = self.loads(snapshot)
        mean = RequestEstimate(max(1, int(self.mean_prompt)), max(1, int(self.mean_output)))
        objective = self.tpot_objective_s(mean, loads)
        return {
            "model": asdict(self.model),
            "equations": self.fit.equations,
            "mean_prompt_tokens": self.mean_prompt,
            "mean_output_tokens": self.mean_output,
            "tpot_objective_s": objective,
            "pack_bound_s": self.pack_bound_s(objective, loads),
            "backlog_wait_s": self.backlog_wait_s(loads),
            "lifetime_s": self.lifetime_s(),
            "instances": {
                load.view.instance_id: {
                    "seqs": load.seqs,
                    "later_seqs": load.later[0] if load.later else load.seqs,
                    "queued_prompt_tokens": load.queued,
                    "prefill_share": load.share,
                    "step_s": self.step_s(load, 1, mean.prompt_tokens),
                    "tpot_s": self.tpot_s(load, mean),
                    "batch_tpot_s": self.batch_tpot_s(load),
                }
                for load in loads
            },
            "rules": {f"{d}/{p}": n for (d, p), n in sorted(self.rule_counts.items())},
            "recent": [asdict(d) for d in reversed(self.recent)],
        }

    # --- rescheduling -------------------------------------------------------------------------

    def plan_migrations(
        self,
        snapshot: ClusterSnapshot,
        moving: Collection[str],
        preempted: Mapping[str, bool],
        budget: int,
    ) -> list[MigrationPlan]:
        """Mitigation first, then one consolidation (see the module docstring)."""
        if budget <= 0:
            return []
        loads = self.loads(snapshot)
        plan = _Plan(self, loads, moving)
        plan.mitigate(preempted, budget)
        if len(plan.moves) < budget:
            plan.consolidate(budget)
        return plan.moves


class _Plan:
    """One rescheduling round: moves and the loads as they would be after them."""

    def __init__(self, policy: AdaptivePolicy, loads: Sequence[Load], moving: Collection[str]):
        self.policy = policy
        self.loads = {load.view.instance_id: load for load in loads}
        self.busy = set(moving)
        self.moves: list[MigrationPlan] = []
        request = RequestEstimate(int(policy.mean_prompt), max(1, int(policy.mean_output)))
        self.objective = policy.tpot_objective_s(request, loads)
        self.bound = policy.pack_bound_s(self.objective, loads)
        self.ttft_limit = policy.slo.ttft_s(request)
        self.request = request

    def movable(self, load: Load) -> list[tuple[str, int, int]]:
        """(key, tokens, blocks) of its decodes that may move, fewest blocks first."""
        report = load.view.load
        if report is None:
            return []
        found = [
            (r.request_key, r.num_tokens, r.num_blocks)
            for r in report.running
            if r.num_output_tokens and r.request_key not in self.busy
        ]
        return sorted(found, key=lambda item: item[2])

    def _moved(self, source: str, target: str, key: str, tokens: int, blocks: int) -> None:
        self.moves.append(MigrationPlan(source, target, key, blocks))
        self.busy.add(key)
        for instance_id, sign in ((source, -1), (target, 1)):
            old = self.loads[instance_id]
            self.loads[instance_id] = replace(
                old, seqs=old.seqs + sign, context=old.context + sign * tokens
            )

    def target_for(self, source: str, tokens: int, idle_ok: bool) -> str | None:
        """Where one decode of ``tokens`` goes: the tightest fit under the bound among the
        decoding instances, else (``idle_ok``) an idle one as dispatch would open it."""
        policy = self.policy
        best: tuple[float, str] | None = None
        for instance_id, load in self.loads.items():
            if instance_id == source or load.seqs <= 0:
                continue
            after = policy.step_s(load, 1, tokens)
            if after <= self.bound and (best is None or after > best[0]):
                best = (after, instance_id)
        if best is not None:
            return best[1]
        if not idle_ok:
            return None
        idle = [load for i, load in self.loads.items() if i != source and load.seqs <= 0]
        opened = min(idle, key=AdaptivePolicy._opening_key, default=None)
        return opened.view.instance_id if opened is not None else None

    def mitigate(self, preempted: Mapping[str, bool], budget: int) -> None:
        policy = self.policy
        for source in list(self.loads):
            load = self.loads[source]
            over = policy.batch_tpot_s(load) > self.objective or preempted.get(source, False)
            if not over:
                continue
            for key, tokens, blocks in self.movable(load):
                if (
                    len(self.moves) >= budget
                    or policy.batch_tpot_s(self.loads[source]) <= self.bound
                ):
                    break
                target = self.target_for(source, tokens, idle_ok=True)
                if target is None:
                    break
                self._moved(source, target, key, tokens, blocks)

    def backlog_tokens(self) -> int:
        """Queued prompt tokens past the TTFT objective: what no instance clears in time."""
        if self.ttft_limit is None:
            return 0
        policy, late = self.policy, 0
        for load in self.loads.values():
            wait = policy.prefill_s(load, load.queued, int(policy.mean_prompt))
            if wait > self.ttft_limit and wait > 0:
                late += int(load.queued * (wait - self.ttft_limit) / wait)
        return late

    def consolidate(self, budget: int) -> None:
        """Empties the decoding instance cheapest to empty, if the backlog pays for it."""
        backlog = self.backlog_tokens()
        if backlog <= 0:
            return
        candidates = [load for load in self.loads.values() if load.seqs > 0]
        for load in sorted(candidates, key=lambda load: load.context):
            decodes = self.movable(load)
            cost = sum(tokens for _, tokens, _ in decodes)
            reported = load.view.load
            if not decodes or cost >= backlog or reported is None:
                continue
            if len(decodes) < reported.num_decoding:
                continue  # some cannot move now (already moving, or not listed)
            if self._empty(load.view.instance_id, decodes, budget):
                return

    def _empty(self, source: str, decodes: list[tuple[str, int, int]], budget: int) -> bool:
        """Plans the decodes of ``source`` away if every one fits elsewhere (else nothing);
        only the first moves the budget allows start this round, the next rounds go on
        (the instance stays the cheapest to empty)."""
        before = (dict(self.loads), list(self.moves), set(self.busy))
        for key, tokens, blocks in decodes:
            target = self.target_for(source, tokens, idle_ok=False)
            if target is None:
                self.loads, self.moves, self.busy = before[0], before[1], before[2]
                return False
            self._moved(source, target, key, tokens, blocks)
        del self.moves[budget:]
        return True
