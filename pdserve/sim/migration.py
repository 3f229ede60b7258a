"""Live migration and the rescheduling loop, on the simulated clock.

Which requests move and where is ``pdserve.scheduler.rescheduling.plan_round`` (the
dispatch policy's own rules, else ``plan_migrations``), called
every ``reschedule_interval_s`` with the bookkeeping of ``Migrator.reschedule_once``
(preemptions since the last round, the migration budget, the back-off of failed moves). How
one move runs follows ``Migrator._run`` (pdserve/gateway/migration.py):

1. pin: a running request with output exports its KV live; one still queued, or without
   output, simply moves (its continuation recomputes);
2. pre-copy, up to ``max_precopy_stages`` rounds: the target runs a one-token request whose
   prompt is the request's full blocks so far; it pulls what its prefix cache lacks, and
   its blocks stay cached there, while the source keeps decoding;
3. cut, right after the source's next token (at most ``CUT_FALLBACK_S`` later): the source
   leg is aborted, its pinned blocks held; the continuation on the target (prompt + output
   so far) finds the pre-copied blocks in its cache, pulls the rest, computes its last
   token and goes on. The downtime is the gap between the last token on the source and the
   first on the target.

A failover, the end of the request, a lost pre-copy or the migration deadline abort it
(the ``MigrationFailure`` codes of the gateway); before the cut the request goes on where it
was.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pdserve.gateway.migration import RETRY_AFTER_ROUNDS, MigrationFailure, MigrationStatus
from pdserve.gateway.session import CUT_FALLBACK_S
from pdserve.scheduler.rescheduling import ReschedulingSettings, plan_round, preempted_since
from pdserve.sim.blocks import Chain
from pdserve.sim.gateway import Phase, Session, SimGateway
from pdserve.sim.legs import Leg, LegState

_serial = itertools.count()


@dataclass
class MigrationRecord:
    """How one simulated migration went (``MigrationResult`` of the gateway, in sim time)."""

    request_key: str
    source: str
    target: str
    started_s: float
    status: MigrationStatus = MigrationStatus.ABORTED
    failure: MigrationFailure | None = None
    stages: int = 0
    precopied_blocks: int = 0
    downtime_s: float | None = None
    duration_s: float = 0.0


class SimMigration:
    """One move: the pre-copy legs' owner, and the session's hook for what happens to it."""

    def __init__(self, mover: SimRescheduler, session: Session, target: str, now: float) -> None:
        assert session.leg is not None and session.instance is not None
        self.mover = mover
        self.gateway = mover.gateway
        self.session = session
        self.target = target
        self.leg: Leg = session.leg  # the leg the move was planned against
        self.pinned: Leg | None = None
        self.precopy: Leg | None = None
        self.copying = 0
        self.copied = 0
        self.cut_leg: Leg | None = None
        self.cut_last_token_at = 0.0
        self.run_key = ("migration", session.key, next(_serial))
        self.deadline = now + mover.settings.migration_timeout_s
        self.record = MigrationRecord(session.key, session.instance, target, now)
        self.done = False

    @property
    def block_size(self) -> int:
        return self.gateway.engines[self.record.source].block_size

    def begin(self, now: float) -> None:
        failure = self._unmovable(now)
        if failure is not None:
            self._end(now, failure)
            return
        self.session.migration = self
        leg = self.leg
        if self.session.output and leg.state is LegState.RUNNING:
            leg.pinned = True
            self.pinned = leg
            self._next_stage(now)
        else:
            self._request_cut(now)

    def _unmovable(self, now: float) -> MigrationFailure | None:
        session = self.session
        if session.phase is not Phase.DECODE or session.leg is not self.leg:
            return MigrationFailure.FINISHED
        if self.leg.engine is None:
            return MigrationFailure.BETWEEN_INSTANCES  # its leg is on its way there
        if session.instance == self.target:
            return MigrationFailure.ALREADY_THERE
        record = self.gateway.control.record(self.target)
        view = record.view(now) if record is not None else None
        if view is None or not view.usable or not view.can_decode:
            return MigrationFailure.TARGET_UNUSABLE
        return None

    # --- pre-copy -----------------------------------------------------------------------------

    def _chain(self, blocks: int) -> Chain:
        """The session's cached runs, then this migration's run, ``blocks`` in all."""
        chain = self.session.chain
        shared = sum(size for _, size in chain)
        if blocks <= shared:
            return chain
        return (*chain, (self.run_key, blocks - shared))

    def _next_stage(self, now: float) -> None:
        if self.done:
            return
        if now > self.deadline:
            self._end(now, MigrationFailure.TIMED_OUT)
            return
        if self.record.stages >= self.mover.settings.max_precopy_stages:
            self._request_cut(now)
            return
        assert self.pinned is not None and self.pinned.engine is not None
        self.pinned.engine.touch(now)
        tokens = self.session.input_len + self.session.output
        full = (tokens - 1) // self.block_size
        if full <= self.copied:
            self._request_cut(now)
            return
        self.copying = full
        prompt = full * self.block_size
        self.precopy = Leg(
            "", prompt, 1, self, self._chain(full), source=self.pinned, source_tokens=prompt
        )
        self.gateway.submit(self.target, self.precopy, now)

    def leg_tokens(
        self, leg: Leg, first_at: float, last_at: float, steps: list[float], lo: int, hi: int
    ) -> None:
        """A pre-copy's one token: discarded."""

    def leg_pulled(self, leg: Leg, at: float) -> None:
        """The pinned export stays: the source still decodes from it."""

    def leg_finished(self, leg: Leg, at: float) -> None:
        if leg is not self.precopy or self.done:
            return
        self.precopy = None
        self.record.stages += 1
        self.record.precopied_blocks += self.copying - self.copied
        self.copied = self.copying
        self._next_stage(at)

    def leg_lost(self, leg: Leg, at: float) -> None:
        if leg is self.precopy and not self.done:
            self.precopy = None
            self._end(at, MigrationFailure.UPSTREAM_ERROR)

    # --- the cut ------------------------------------------------------------------------------

    def _request_cut(self, now: float) -> None:
        """Cut right after the leg's next token, or at the fallback (``Cut``'s wait)."""
        engine = self.leg.engine
        when = engine.next_token_at(self.leg) if engine is not None else None
        when = now if when is None else min(when, now + CUT_FALLBACK_S)
        self.gateway.at(when, self._cut, None)

    def _cut(self, _: object) -> None:
        if self.done:
            return
        now = self.gateway.control.clock()
        if self.leg.engine is not None:
            self.leg.engine.touch(now)
        failure = self._unmovable(now)
        if failure is not None:
            self._end(now, failure)
            return
        export = self.pinned if self.leg.state is LegState.RUNNING else None
        self.cut_last_token_at = self.session.last_at
        self.cut_leg = self.gateway.cut(
            self.session, self.target, export, self._chain(self.copied), now
        )
        self.pinned = None  # from here on the session's legs own the export

    # --- what the session tells ---------------------------------------------------------------

    def tokens_arrived(self, leg: Leg, first_at: float) -> None:
        if leg is self.cut_leg and not self.done:
            self.record.downtime_s = first_at - self.cut_last_token_at
            self._end(first_at, None)

    def failed_over(self, now: float) -> None:
        if not self.done:
            failure = (
                MigrationFailure.CONTINUATION_FAILED
                if self.cut_leg is not None
                else MigrationFailure.FAILED_OVER
            )
            self._end(now, failure)

    def session_ended(self, now: float) -> None:
        if not self.done:
            self._end(now, MigrationFailure.FINISHED)

    def _end(self, now: float, failure: MigrationFailure | None) -> None:
        self.done = True
        record = self.record
        record.failure = failure
        record.status = MigrationStatus.COMPLETED if failure is None else MigrationStatus.ABORTED
        record.duration_s = now - record.started_s
        if self.precopy is not None:
            self.gateway.cancel(self.precopy, now)
            self.precopy = None
        if self.pinned is not None and self.pinned.engine is not None:
            self.pinned.engine.unpin(self.pinned, now)
            self.pinned = None
        if self.session.migration is self:
            self.session.migration = None
        self.mover.ended(self, now)


@dataclass
class ReschedulerCounters:
    rounds: int = 0
    records: list[MigrationRecord] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return sum(r.status is MigrationStatus.COMPLETED for r in self.records)


class SimRescheduler:
    """``Migrator``'s rounds and bookkeeping around ``plan_round``."""

    def __init__(
        self,
        gateway: SimGateway,
        settings: ReschedulingSettings,
        watermark: float,
        at: Callable[[float, Callable[[Any], None], Any], None],
    ) -> None:
        self.gateway = gateway
        self.settings = settings
        self.watermark = watermark
        self.at = at
        self.moving: dict[str, SimMigration] = {}
        self.counters = ReschedulerCounters()
        self._preemptions: dict[str, int] = {}
        self._failed_at: dict[str, float] = {}

    def migrate(self, session: Session, target: str, now: float) -> SimMigration:
        """Starts one move (``Migrator.start``; as ``POST /admin/migrate`` does too)."""
        existing = self.moving.get(session.key)
        if existing is not None:
            return existing
        move = SimMigration(self, session, target, now)
        self.moving[session.key] = move
        move.begin(now)
        return move

    def ended(self, move: SimMigration, now: float) -> None:
        self.moving.pop(move.session.key, None)
        self.counters.records.append(move.record)
        if move.record.status is not MigrationStatus.COMPLETED:
            self._failed_at[move.session.key] = now

    def round(self, now: float) -> int:
        """``Migrator.reschedule_once`` on the simulated clock; returns moves started."""
        self.counters.rounds += 1
        self.gateway.sync(now)
        snapshot = self.gateway.control.snapshot()
        preempted = preempted_since(snapshot, self._preemptions)
        budget = self.settings.max_migrations - len(self.moving)
        backoff = RETRY_AFTER_ROUNDS * self.settings.reschedule_interval_s
        self._failed_at = {k: t for k, t in self._failed_at.items() if now - t < backoff}
        left_alone = set(self.moving) | set(self._failed_at)
        plans = plan_round(
            self.gateway.control.policy,
            snapshot,
            self.settings,
            left_alone,
            preempted,
            budget,
            self.watermark,
        )
        started = 0
        for plan in plans:
            session = self.gateway.sessions.get(plan.request_key)
            if session is not None and session.instance == plan.source:
                self.migrate(session, plan.target, now)
                started += 1
        return started
