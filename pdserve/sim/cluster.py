"""A whole simulated cluster: instances with roles, the real control plane, time running.

Each instance is a ``SimEngine`` that registers with the gateway's ``ControlPlane``
(``Register``) and sends a ``LoadReport`` every report interval from a random phase, so the
gateway decides on reports up to one interval old plus its own pending accounting, as in
production. Reports are delivered lazily: before any decision the gateway takes (a
dispatch, a rescheduling round), each instance's report of the last report time is built
from the engine's state *at that time* and handed to ``ControlPlane.handle``; reports that
no decision could have read in between are skipped, which the control plane cannot tell
apart (a newer report replaces all of an older one, and its pending entries expire by the
newer report's time).

Instances fail and join at given times. A failed instance stops reporting; the legs it
held are lost at once (their connections break, as a killed process's do): their sessions
fail over, pulls from its exports fail and are recomputed by the puller. The control plane
takes it out of rotation (``mark_broken``, then its silence), as it would.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pdserve.gateway.context import SloShedding
from pdserve.gateway.control_plane import ControlPlane
from pdserve.gateway.settings import GatewaySettings
from pdserve.protocol.reports import Register, Role
from pdserve.scheduler.admission import TtftPredictor
from pdserve.scheduler.dispatch import DispatchSettings, make_policy
from pdserve.scheduler.rescheduling import ReschedulingSettings
from pdserve.sim.engine import SimEngine
from pdserve.sim.events import EventQueue
from pdserve.sim.gateway import Outcome, Session, SimGateway
from pdserve.sim.legs import EngineConfig
from pdserve.sim.migration import SimRescheduler
from pdserve.sim.prefix_events import PrefixOutbox, RunKeys
from pdserve.sim.profile import StepProfile

SECRET = b"pdserve-sim"
# Checks of the control plane's health rules run this long after each deadline.
_AFTER = 1e-6
# A report is looked at this many intervals before its time (``latest_tick``'s rounding).
_EARLY = 1e-8


@dataclass(frozen=True)
class InstanceChange:
    """An instance joining (``role``) or failing (``instance_id``) at ``at_s``."""

    at_s: float
    role: Role | None = None
    instance_id: str | None = None


class SimCluster:
    """Instances present from the start join at 0 and have reported once by ``warmup_s``,
    when the first request may arrive (``run`` shifts every arrival by it)."""

    def __init__(
        self,
        profile: StepProfile,
        roles: Sequence[Role],
        gateway: GatewaySettings | None = None,
        dispatch: DispatchSettings | None = None,
        rescheduling: ReschedulingSettings | None = None,
        engine: EngineConfig | None = None,
        report_interval_s: float = 0.1,
        changes: Iterable[InstanceChange] = (),
        seed: int = 0,
    ) -> None:
        """``roles``: one per instance present from the start (named ``ROLE-NN``)."""
        self.profile = profile
        self.gateway_settings = gateway or GatewaySettings()
        self.dispatch_settings = dispatch or DispatchSettings()
        self.rescheduling_settings = rescheduling or ReschedulingSettings()
        self.engine_config = engine or EngineConfig.of(profile)
        self.report_interval_s = report_interval_s
        self.warmup_s = report_interval_s
        self.queue = EventQueue()
        self.rng = np.random.default_rng(seed)
        self.control = ControlPlane(
            self.gateway_settings,
            SECRET,
            make_policy(self.dispatch_settings),
            clock=self.queue.clock,
        )
        # The engines' prefix events, for a policy that reads the prefix index (the runs'
        # chain keys: ``pdserve.sim.prefix_events``, filled by whoever makes the sessions).
        self.runs = RunKeys()
        self.outbox = PrefixOutbox(self.runs) if self.control.prefix.wants_events else None
        self.engines: dict[str, SimEngine] = {}
        self.failed: list[SimEngine] = []
        self._delivered: dict[str, int] = {}
        # (when the next report is due, serial, instance): the instances ``sync`` looks at.
        self._due: list[tuple[float, int, SimEngine]] = []
        self._serial = 0
        self._counts: dict[str, int] = {}
        self._roles: dict[str, Role] = {}
        self.gateway = SimGateway(
            self.control,
            self.gateway_settings,
            self.engines,
            self.sync,
            self.queue.at,
            self.next_report,
            profile.request_overhead_s,
            shedding=SloShedding(
                self.gateway_settings,
                TtftPredictor(self.dispatch_settings.default_prefill_tokens_per_s),
                self.dispatch_settings.slo,
            ),
            send_priority=self.engine_config.priority_scheduling,
        )
        self.rescheduler = SimRescheduler(
            self.gateway,
            self.rescheduling_settings,
            self.dispatch_settings.watermark,
            self.queue.at,
        )
        self._pending_arrivals = 0
        for role in roles:
            self._join(role, 0.0)
        for change in changes:
            if change.role is not None:
                self.queue.at(change.at_s, self._on_join, change.role)
            elif change.instance_id is not None:
                self.queue.at(change.at_s, self._on_fail, change.instance_id)

    # --- instances --------------------------------------------------------------------------

    def _name(self, role: Role) -> str:
        index = self._counts.get(role, 0)
        self._counts[role] = index + 1
        return f"{role}-{index:02d}"

    def _join(self, role: Role, now: float) -> SimEngine:
        instance_id = self._name(role)
        incarnation = f"{instance_id}@{now:g}"
        phase = now + float(self.rng.uniform(0, self.report_interval_s))
        engine = SimEngine(
            instance_id,
            self.profile,
            self.engine_config,
            self.queue,
            incarnation=incarnation,
            report_interval_s=self.report_interval_s,
            report_phase_s=phase,
            # Only rescheduling reads the running requests of a report.
            list_running=self.rescheduling_settings.rescheduling,
        )
        if self.outbox is not None:
            engine.pool.listener = self.outbox.listener(engine)
        self.engines[instance_id] = engine
        self._delivered[instance_id] = -1
        self._expect(instance_id, engine, 0)
        self._roles[instance_id] = role
        register = Register(
            instance_id=instance_id,
            role=role,
            url=f"sim://{instance_id}",
            host="sim",
            pid=len(self.engines),
            model=self.profile.model or self.profile.name,
            kv_addresses=[f"sim://{instance_id}/kv"],
            control_address=f"sim://{instance_id}/control",
            max_model_len=self.profile.max_model_len,
            started_at=now,
            incarnation=incarnation,
        )
        self.control.handle(register, now)
        return engine

    def _on_join(self, role: Role) -> None:
        self._join(role, self.queue.now)

    def _on_fail(self, instance_id: str) -> None:
        engine = self.engines.get(instance_id)
        if engine is None or not engine.alive:
            return
        now = self.queue.now
        self.sync(now)  # what it reported until now reached the gateway
        lost = engine.fail(now)
        self.failed.append(engine)
        self.control.mark_broken(instance_id)
        for leg in lost:
            for puller in list(leg.pullers):
                if puller.engine is not None:
                    puller.engine.pull_failed(puller, now)
            leg.pullers.clear()
        for leg in lost:
            leg.owner.leg_lost(leg, now)
        settings = self.gateway_settings
        for delay in (settings.heartbeat_timeout_s, settings.dead_after_s, settings.forget_after_s):
            self.queue.at(now + delay + _AFTER, self._check_health, None)

    def _check_health(self, _: object) -> None:
        self.sync(self.queue.now)

    # --- load reports -----------------------------------------------------------------------

    def _expect(self, instance_id: str, engine: SimEngine, tick: int) -> None:
        """The instance's next report to deliver is ``tick``'s: due a little before its
        time (``latest_tick`` decides; this only orders the instances)."""
        due = engine.tick_time(tick) - _EARLY * self.report_interval_s
        self._serial += 1
        heapq.heappush(self._due, (due, self._serial, engine))

    def sync(self, now: float) -> None:
        """Delivers each live instance's latest report sent by ``now`` (see the module doc):
        only instances with a report due are looked at (a heap by due time)."""
        control = self.control
        if self.outbox is not None:  # what the pools cached and evicted, before the reports
            self.outbox.flush(lambda batch: control.handle(batch, now))
        delivered = self._delivered
        due = self._due
        early: list[tuple[float, int, SimEngine]] = []
        while due and due[0][0] <= now:
            entry = heapq.heappop(due)
            engine = entry[2]
            if not engine.alive:
                continue  # no more reports
            instance_id = engine.instance_id
            tick = engine.latest_tick(now)
            if tick <= delivered[instance_id]:
                early.append(entry)
                continue
            report = engine.report_at(tick)
            if report is not None:
                control.handle(report, engine.tick_time(tick))
            delivered[instance_id] = tick
            self._expect(instance_id, engine, tick + 1)
        for entry in early:
            heapq.heappush(due, entry)
        if self.failed:
            control.check_health(now)

    def next_report(self, now: float) -> float | None:
        """When the next report of a live decode-capable instance is sent."""
        best: float | None = None
        for instance_id, engine in self.engines.items():
            if engine.alive and self._roles[instance_id] != "prefill":
                tick = engine.latest_tick(now) + 1
                when = engine.tick_time(tick)
                if when <= now:
                    when = engine.tick_time(tick + 1)
                best = when if best is None else min(best, when)
        return best

    # --- running ----------------------------------------------------------------------------

    def run(
        self, sessions: Sequence[Session], after_each: Callable[[], None] | None = None
    ) -> float:
        """Serves every session (sent ``start_s`` after the warm-up; a conversation's later
        turn its think time after the turn before it ended); returns when the last one
        ended, in seconds from the first send time (0). ``after_each``: called after every
        event (tests check invariants with it)."""
        self._pending_arrivals = len(sessions)
        last = [0.0]

        def done(session: Session) -> None:
            last[0] = max(last[0], session.last_at, session.sent_at)
            if session.next_turn is not None:
                self._next_turn(session, session.next_turn)

        self.gateway.on_done = done
        for session in sessions:
            if not session.follows:
                session.sent_at = session.start_s + self.warmup_s
                self.queue.at(session.sent_at, self._on_arrival, session)
        if self.rescheduling_settings.rescheduling:
            interval = self.rescheduling_settings.reschedule_interval_s
            self.queue.at(interval, self._on_round, None)
        self.queue.run(after_each=after_each)
        return max(0.0, last[0] - self.warmup_s)

    def _on_arrival(self, session: Session) -> None:
        self._pending_arrivals -= 1
        self.gateway.arrive(session)

    def _next_turn(self, ended: Session, turn: Session) -> None:
        """A conversation goes on after a completed turn, or ends: its turns left are not
        sent (their records say why)."""
        now = self.queue.now
        if ended.outcome is Outcome.COMPLETED:
            turn.sent_at = now + turn.think_s
            turn.start_s = turn.sent_at - self.warmup_s
            self.queue.at(turn.sent_at, self._on_arrival, turn)
            return
        left: Session | None = turn
        while left is not None:
            self._pending_arrivals -= 1
            left.sent_at, left.start_s = now, now - self.warmup_s
            left.outcome = Outcome.NOT_SENT
            left.error = f"not sent: request {ended.index} of its conversation did not complete"
            left = left.next_turn

    def _on_round(self, _: object) -> None:
        if self._pending_arrivals == 0 and self.gateway.open == 0:
            return  # nothing left to balance: the loop ends with the run
        now = self.queue.now
        self.rescheduler.round(now)
        self.queue.at(now + self.rescheduling_settings.reschedule_interval_s, self._on_round)

    # --- checks -----------------------------------------------------------------------------

    def leaks(self) -> list[str]:
        """What a finished run left behind (nothing, when conservation holds)."""
        problems = []
        for instance_id, engine in self.engines.items():
            if not engine.alive:
                continue
            pool = engine.pool
            if pool.free != pool.total:
                problems.append(f"{instance_id}: {pool.total - pool.free} blocks in use")
            if engine.exported:
                problems.append(f"{instance_id}: {len(engine.exported)} held exports")
            if not engine.idle():
                problems.append(f"{instance_id}: legs left")
        if self.gateway.open:
            problems.append(f"{self.gateway.open} sessions not ended")
        return problems


def roles_of(prefill: int, decode: int, both: int) -> list[Role]:
    """Instances from the start, by role."""
    roles: list[Role] = []
    roles += ["prefill"] * prefill
    roles += ["decode"] * decode
    roles += ["both"] * both
    return roles
