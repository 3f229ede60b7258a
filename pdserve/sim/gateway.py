"""The gateway's side of the simulation: client requests (sessions) around the real control plane.

Every decision is the gateway's own code: ``ControlPlane.dispatch`` (the policy over the
snapshot with pending and held work), ``place`` / ``decode_started`` / ``forget_held`` /
``dispatch_decode`` / ``mark_broken``. What is simulated is only what the gateway's
``RequestSession`` does with those decisions, as events instead of HTTP calls:

- admission: with ``--shed-over-slo``, the gateway's own ``SloShedding`` first (a request
  of the lowest class no instance is predicted to serve within its TTFT SLO is refused,
  429); then at most ``max_inflight`` sessions at once, ``max_queued`` more wait, the rest
  are refused (429);
- priorities: with ``send_priority`` each request carries its class, as a client sending
  vLLM's ``priority`` field: the policies read it (``RequestEstimate.priority``) and the
  engines schedule by it (``EngineConfig.priority_scheduling``); without, every request is
  sent alike and only the records keep the class;
- a disaggregated request runs a prefill leg (``max_tokens`` 1, its KV exported) on the
  prefill instance, then a decode leg on the decode instance that pulls the KV and produces
  every output token, the first included: that first token is the client's TTFT (the prefill
  leg's own token is not streamed, as in ``RequestSession._prefill``);
- ``NoCapacity`` holds the request; it asks again at each load report and after
  ``admission_wait_s`` is placed whole on the decode instance the policy preferred, as
  ``ControlPlane.dispatch_with_room`` does;
- a leg lost with its instance fails over (``max_failovers``): the request goes on where the
  policy says (placed at once on a full instance, as ``_next_leg``), prompt + output so far
  as its prompt, recomputed.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pdserve.gateway.context import SloShedding
from pdserve.gateway.control_plane import ControlPlane
from pdserve.gateway.errors import APIError
from pdserve.gateway.settings import GatewaySettings
from pdserve.scheduler.dispatch import Dispatch, NoCapacity, NoInstance
from pdserve.scheduler.snapshot import RequestEstimate
from pdserve.sim.blocks import Chain
from pdserve.sim.engine import SimEngine
from pdserve.sim.legs import Leg, LegState
from pdserve.workload.metrics import RequestRecord
from pdserve.workload.workloads import BenchRequest


class MoveHook(Protocol):
    """A live migration of the session (``pdserve.sim.migration``), told what happens to it."""

    def tokens_arrived(self, leg: Leg, first_at: float) -> None: ...

    def failed_over(self, now: float) -> None: ...

    def session_ended(self, now: float) -> None: ...


class Phase(enum.Enum):
    QUEUED = "queued"  # waiting for a gateway slot (max_inflight)
    HELD = "held"  # every decode instance full: waiting for a load report with room
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


class Outcome(enum.StrEnum):
    """How a request ended, as its client saw it."""

    COMPLETED = "completed"
    REJECTED = "rejected"  # 429: the gateway's queue was full
    SHED = "shed"  # 429: predicted to miss its TTFT SLO everywhere (--shed-over-slo)
    NO_INSTANCE = "no_instance"  # 503: no healthy instance for a role
    ABANDONED = "abandoned"  # its instance failed more than max_failovers times
    NOT_SENT = "not_sent"  # an earlier turn of its conversation did not complete


@dataclass(eq=False)
class Session:
    """One client request: what the gateway knows of it and what its client has seen."""

    index: int
    key: str
    input_len: int
    output_len: int
    start_s: float  # send time, from the run's first (what its record says)
    chain: Chain = ()
    # A conversation's turn: its prompt's token ids, the turn sent after this one ends (its
    # think time later), and whether this one waits for the one before it.
    token_ids: tuple[int, ...] | None = None
    next_turn: Session | None = None
    think_s: float = 0.0
    follows: bool = False
    priority: int = 0  # the workload's class (above 0: high), in the policies' convention
    sent_at: float = 0.0  # send time on the simulated clock
    gateway: SimGateway | None = None
    phase: Phase = Phase.QUEUED
    output: int = 0  # tokens the client has received
    first_at: float | None = None
    last_at: float = 0.0
    itl: list[float] = field(default_factory=list)
    leg: Leg | None = None  # the leg streaming to the client
    prefill_leg: Leg | None = None
    export: Leg | None = None  # the export the current leg pulls from
    instance: str | None = None  # where ``leg`` runs
    decode_target: str | None = None
    failovers: int = 0
    held_since: float = 0.0
    held_for: NoCapacity | None = None
    migration: MoveHook | None = None
    outcome: Outcome | None = None
    error: str = ""

    # --- LegOwner: the client's view of the stream --------------------------------------------

    def leg_tokens(
        self, leg: Leg, first_at: float, last_at: float, steps: list[float], lo: int, hi: int
    ) -> None:
        if leg is not self.leg:
            return  # the prefill leg's token is not streamed; a cut leg's are dropped
        if self.first_at is None:
            self.first_at = first_at
        else:
            self.itl.append(first_at - self.last_at)
        if hi - lo > 1:
            self.itl += steps[lo + 1 : hi]
        self.last_at = last_at
        self.output += hi - lo
        if self.migration is not None:
            self.migration.tokens_arrived(leg, first_at)

    def leg_pulled(self, leg: Leg, at: float) -> None:
        assert self.gateway is not None
        self.gateway.pulled(self, leg, at)

    def leg_finished(self, leg: Leg, at: float) -> None:
        assert self.gateway is not None
        self.gateway.leg_finished(self, leg, at)

    def leg_lost(self, leg: Leg, at: float) -> None:
        assert self.gateway is not None
        self.gateway.leg_lost(self, leg, at)

    def record(self) -> RequestRecord:
        done = self.outcome is Outcome.COMPLETED and self.first_at is not None
        return RequestRecord(
            index=self.index,
            input_len=self.input_len,
            output_len=self.output_len,
            start_s=self.start_s,
            ttft_s=(self.first_at - self.sent_at) if self.first_at is not None else None,
            itl_s=self.itl,
            e2e_s=(self.last_at - self.sent_at) if done else None,
            output_tokens=self.output,
            priority=self.priority,
            success=done,
            error="" if done else (self.error or str(self.outcome)),
        )


def prefix_chain(request: BenchRequest, block_size: int) -> Chain:
    """The named cached run a request's prompt starts with: its shared prefix, whole blocks
    (read if the workload has them, so workloads without the fields work too)."""
    group = getattr(request, "prefix_group", None)
    length = int(getattr(request, "prefix_len", 0) or 0)
    if group is None or length < block_size:
        return ()
    return ((("prefix", group), length // block_size),)


@dataclass
class GatewayCounters:
    held: int = 0
    held_s: float = 0.0
    failovers: int = 0
    rejected: int = 0
    shed: int = 0
    decision_ns: list[int] = field(default_factory=list)


class SimGateway:
    """Sessions, admission, holds and failover; the decisions are the control plane's."""

    def __init__(
        self,
        control: ControlPlane,
        settings: GatewaySettings,
        engines: dict[str, SimEngine],
        sync: Callable[[float], None],
        at: Callable[[float, Callable[[Any], None], Any], None],
        next_report: Callable[[float], float | None],
        request_overhead_s: float = 0.0,
        shedding: SloShedding | None = None,
        send_priority: bool = False,
    ) -> None:
        """``sync(now)`` delivers the load reports sent by ``now``; ``at`` schedules an
        event; ``next_report(now)``: when the next report of a decode-capable instance
        arrives; ``shedding``: the gateway's admission control (it reads
        ``--shed-over-slo`` itself); ``send_priority``: the requests carry their class."""
        self.control = control
        self.settings = settings
        self.engines = engines
        self.sync = sync
        self.at = at
        self.next_report = next_report
        self.overhead_s = request_overhead_s
        self.shedding = shedding if shedding is not None and shedding.enabled else None
        self.send_priority = send_priority
        self.sessions: dict[str, Session] = {}
        self.queued: deque[Session] = deque()
        self.held: deque[Session] = deque()
        self.inflight = 0
        self.open = 0  # sessions not done
        self.counters = GatewayCounters()
        self._retry_pending = False
        self.on_done: Callable[[Session], None] | None = None

    # --- arrival and admission ----------------------------------------------------------------

    def arrive(self, session: Session) -> None:
        session.gateway = self
        self.sessions[session.key] = session
        self.open += 1
        if self._shed(session):
            return
        if self.inflight < self.settings.max_inflight:
            self._start(session, session.sent_at)
        elif len(self.queued) < self.settings.max_queued:
            self.queued.append(session)
        else:
            self.counters.rejected += 1
            self.finish(session, Outcome.REJECTED, session.sent_at, "the cluster is at capacity")

    def _shed(self, session: Session) -> bool:
        """``GatewayContext.admit`` before a slot is taken: ``SloShedding.check`` on fresh
        reports; True: refused (ended)."""
        if self.shedding is None:
            return False
        now = session.sent_at
        self.sync(now)
        try:
            self.shedding.check(self.control, self.estimate(session))
        except APIError as refused:
            self.counters.shed += 1
            self.finish(session, Outcome.SHED, now, str(refused))
            return True
        return False

    def _start(self, session: Session, now: float) -> None:
        self.inflight += 1
        self._first_dispatch(session, now)

    def estimate(self, session: Session) -> RequestEstimate:
        """What the gateway knows before any instance saw the request (``budget``: max_tokens;
        the prompt's token ids, for the prefix index, while it is the prompt sent)."""
        ids = session.token_ids if session.output == 0 else None
        return RequestEstimate(
            session.input_len + session.output,
            session.output_len,
            prompt_token_ids=ids,
            priority=self.sent_priority(session),
        )

    def sent_priority(self, session: Session) -> int:
        """The class the gateway sees (policies' convention: higher first; 0 unsent)."""
        return session.priority if self.send_priority else 0

    def dispatch(self, estimate: RequestEstimate, key: str | None) -> Dispatch:
        """``ControlPlane.dispatch`` on fresh reports, its wall-clock time recorded."""
        self.sync(self.control.clock())
        started = time.perf_counter_ns()
        try:
            return self.control.dispatch(estimate, key=key)
        finally:
            self.counters.decision_ns.append(time.perf_counter_ns() - started)

    def _first_dispatch(self, session: Session, now: float) -> None:
        try:
            choice = self.dispatch(self.estimate(session), session.key)
        except NoInstance as e:
            self.finish(session, Outcome.NO_INSTANCE, now, str(e))
        except NoCapacity as full:
            self._hold(session, full, now)
        else:
            self._placed(session, choice, now)

    def _placed(self, session: Session, choice: Dispatch, now: float) -> None:
        if choice.prefill is not None:
            session.phase = Phase.PREFILL
            session.decode_target = choice.decode
            leg = Leg(session.key, session.input_len, 1, session, session.chain, keep=True)
            session.prefill_leg = leg
            self.submit(choice.prefill, leg, now)
            return
        self.control.decode_started(session.key, choice.decode)
        self._decode_leg(session, choice.decode, None, now)

    # --- held for decode room -----------------------------------------------------------------

    def _hold(self, session: Session, full: NoCapacity, now: float) -> None:
        if session.phase is not Phase.HELD:
            session.held_since = now
            self.counters.held += 1
            self.held.append(session)
            self.at(now + self.settings.admission_wait_s, self._hold_expired, session)
        session.phase = Phase.HELD
        session.held_for = full
        self._schedule_retry(now)

    def _schedule_retry(self, now: float) -> None:
        if self._retry_pending or not self.held:
            return
        when = self.next_report(now)
        if when is not None:
            self._retry_pending = True
            self.at(when, self._retry_held, None)

    def _retry_held(self, _: object) -> None:
        """A load report arrived: every held request asks again (``dispatch_with_room``)."""
        self._retry_pending = False
        now = self.control.clock()
        for session in list(self.held):
            if session.phase is Phase.HELD:
                self._ask_again(session, now, expired=False)
        self._schedule_retry(now)

    def _hold_expired(self, session: Session) -> None:
        if session.phase is Phase.HELD:
            self._ask_again(session, self.control.clock(), expired=True)

    def _ask_again(self, session: Session, now: float, expired: bool) -> None:
        estimate = self.estimate(session)
        key = session.key
        try:
            choice = self.dispatch(estimate, key)
        except NoInstance as e:
            self._unhold(session, now)
            self.finish(session, Outcome.NO_INSTANCE, now, str(e))
            return
        except NoCapacity as full:
            if not expired or full.decode not in self.control.instances:
                session.held_for = full
                return
            choice = Dispatch(decode=full.decode)  # waited long enough: placed whole
            self.control.place(choice, estimate, key)
        self._unhold(session, now)
        self._placed(session, choice, now)

    def _unhold(self, session: Session, now: float) -> None:
        self.held.remove(session)
        self.counters.held_s += now - session.held_since
        session.held_for = None

    # --- legs ---------------------------------------------------------------------------------

    def submit(self, instance_id: str, leg: Leg, now: float) -> None:
        """Sends a leg to an instance; it reaches the engine after the request overhead. A
        session's legs carry its priority in vLLM's convention (every leg's body has the
        client's ``priority`` field); a migration's pre-copy none."""
        if isinstance(leg.owner, Session):
            leg.priority = -self.sent_priority(leg.owner)
        self.at(now + self.overhead_s, self._land, (instance_id, leg))

    def _land(self, arg: tuple[str, Leg]) -> None:
        instance_id, leg = arg
        if leg.state is not LegState.WAITING:
            return  # cancelled on the way
        now = self.control.clock()
        engine = self.engines.get(instance_id)
        if engine is None or not engine.alive:
            self.control.mark_broken(instance_id)  # the connection is refused
            leg.state = LegState.ABORTED
            leg.owner.leg_lost(leg, now)
            return
        engine.add(leg, now)

    def cancel(self, leg: Leg, now: float) -> None:
        """Aborts a leg wherever it is (on its way: it never lands)."""
        if leg.engine is None:
            leg.state = LegState.ABORTED
        else:
            leg.engine.abort(leg, now)

    def cut(
        self, session: Session, target: str, export: Leg | None, chain: Chain, now: float
    ) -> Leg:
        """A migration's cut: the leg on the source is closed (its pinned KV stays for the
        pull) and the request continues on ``target``; returns the continuation leg."""
        old = session.leg
        assert old is not None and old.engine is not None
        old.engine.abort(old, now)
        tokens = session.input_len + session.output
        leg = Leg(
            session.key,
            tokens,
            session.output_len - session.output,
            session,
            chain,
            source=export,
            source_tokens=tokens - 1 if export is not None else 0,
        )
        session.leg, session.instance, session.export = leg, target, export
        self.submit(target, leg, now)
        return leg

    def _decode_leg(self, session: Session, target: str, source: Leg | None, now: float) -> None:
        session.phase = Phase.DECODE
        leg = Leg(
            session.key,
            session.input_len,
            session.output_len,
            session,
            session.chain,
            source=source,
            source_tokens=session.input_len if source is not None else 0,
        )
        session.leg, session.instance, session.export = leg, target, source
        self.submit(target, leg, now)

    def _prefill_done(self, session: Session, leg: Leg, now: float) -> None:
        """``RequestSession._decode_target``: the decode instance may have gone meanwhile."""
        target = session.decode_target
        assert target is not None
        # No report needs delivering first: only a failure (mark_broken, at once) or a
        # drain changes whether the target is usable.
        source: Leg | None = leg
        record = self.control.record(target)
        view = record.view(now) if record is not None else None
        if view is None or not view.usable or not view.can_decode:
            try:
                chosen = self.control.dispatch_decode(self.estimate(session), prefilled=True)
            except NoInstance as e:
                self._release(leg, now)
                self.finish(session, Outcome.NO_INSTANCE, now, str(e))
                return
            if leg.engine is not None and chosen == leg.engine.instance_id:
                self._release(leg, now)
                source = None
            target = chosen
        self.control.decode_started(session.key, target)
        self._decode_leg(session, target, source, now)

    def _release(self, leg: Leg | None, now: float) -> None:
        if leg is not None and leg.engine is not None:
            leg.engine.release(leg, now)

    def pulled(self, session: Session, leg: Leg, now: float) -> None:
        """The leg has its KV: the export it came from is freed (a pin is the migration's)."""
        if leg is session.leg and session.export is not None:
            self._release(session.export, now)
            session.export = None

    def leg_finished(self, session: Session, leg: Leg, now: float) -> None:
        if leg is session.prefill_leg and session.phase is Phase.PREFILL:
            self._prefill_done(session, leg, now)
        elif leg is session.leg:
            self.finish(session, Outcome.COMPLETED, now)

    def leg_lost(self, session: Session, leg: Leg, now: float) -> None:
        """The leg's instance died (or refused it)."""
        if session.phase is Phase.DONE:
            return
        if leg is session.prefill_leg and session.phase is Phase.PREFILL:
            # RequestSession._prefill: the prefill broke, the decode instance prefills.
            session.prefill_leg = None
            target = session.decode_target
            assert target is not None
            self.control.decode_started(session.key, target)
            self._decode_leg(session, target, None, now)
        elif leg is session.leg:
            self.fail_over(session, now)

    def fail_over(self, session: Session, now: float) -> None:
        """``RequestSession._next_leg`` after a broken leg: anywhere the policy says."""
        if session.migration is not None:
            session.migration.failed_over(now)
        session.leg = None
        self._release(session.export, now)  # nobody will pull it now
        session.export = None
        if session.instance is not None:
            self.control.mark_broken(session.instance)
        session.failovers += 1
        self.counters.failovers += 1
        if session.failovers > self.settings.max_failovers:
            self.finish(session, Outcome.ABANDONED, now, f"failed {session.failovers} times")
            return
        estimate = self.estimate(session)
        try:
            choice = self.dispatch(estimate, None)
        except NoInstance as e:
            self.finish(session, Outcome.ABANDONED, now, str(e))
            return
        except NoCapacity as full:
            # dispatch_with_room(estimate, None, 0.0): already streaming, it goes on at once.
            choice = Dispatch(decode=full.decode)
            self.control.place(choice, estimate, None)
        self._continue(session, choice.decode, now)

    def _continue(self, session: Session, target: str, now: float) -> None:
        """A continuation leg: prompt + output so far, recomputed, for the tokens left."""
        session.phase = Phase.DECODE
        leg = Leg(
            session.key,
            session.input_len + session.output,
            session.output_len - session.output,
            session,
            session.chain,
        )
        session.leg, session.instance, session.export = leg, target, None
        self.submit(target, leg, now)

    # --- the end ------------------------------------------------------------------------------

    def finish(self, session: Session, outcome: Outcome, now: float, error: str = "") -> None:
        if session.phase is Phase.DONE:
            return
        if session.phase is Phase.HELD:
            self._unhold(session, now)
        if session.migration is not None:
            session.migration.session_ended(now)
        took_slot = outcome not in (Outcome.REJECTED, Outcome.SHED)
        session.phase = Phase.DONE
        session.outcome, session.error = outcome, error
        self.control.forget_held(session.key)
        for leg in (session.leg, session.prefill_leg):
            if leg is None or leg.state is LegState.FINISHED:
                continue
            self.cancel(leg, now)
            if leg.engine is not None:
                leg.engine.release(leg, now)
        self._release(session.export, now)
        self.open -= 1
        self.sessions.pop(session.key, None)
        if self.on_done is not None:
            self.on_done(session)
        if took_slot:
            self.inflight -= 1
            if self.queued and self.inflight < self.settings.max_inflight:
                self._start(self.queued.popleft(), now)
