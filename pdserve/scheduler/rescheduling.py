"""Which running requests to move between decode instances, and where (Llumnix's idea).

Dispatch decides once; load changes afterwards (long outputs, skewed prompts), so the
rescheduler keeps fixing it by live migration. Over a cluster snapshot it pairs the most loaded
decode instance with the least loaded one by *virtual usage* (the fraction of KV blocks in use
or wanted by queued requests), and moves one request at a time from the first to the second
while that narrows the gap without inverting it. An instance that preempted requests since
the last round counts as overloaded whatever its usage. Requests with the fewest blocks go
first by default: they are the cheapest to move.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from pdserve.scheduler.snapshot import ClusterSnapshot, InstanceView


class ReschedulingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rescheduling: bool = Field(False, description="migrate running requests to balance decode load")
    reschedule_interval_s: float = Field(
        1.0, gt=0, description="seconds between rescheduling rounds"
    )
    max_migrations: int = Field(2, ge=1, description="migrations in flight at once")
    migrate_out_usage: float = Field(
        0.7, ge=0, le=1, description="virtual KV usage above which an instance sheds requests"
    )
    min_usage_gap: float = Field(
        0.15, ge=0, le=1, description="least usage difference between two instances worth a move"
    )
    pick: Literal["fewest-blocks", "most-blocks"] = Field(
        "fewest-blocks", description="which requests move first"
    )
    max_precopy_stages: int = Field(3, ge=0, description="pre-copy rounds before the cut")
    migration_timeout_s: float = Field(
        60.0, gt=0, description="a migration taking longer is abandoned"
    )


@dataclass(frozen=True)
class MigrationPlan:
    source: str
    target: str
    request_key: str
    blocks: int


def virtual_usage(view: InstanceView, watermark: float) -> float:
    load = view.load
    if load is None or load.total_blocks <= 0:
        return 1.0
    return 1.0 - view.virtual_free_blocks(watermark) / load.total_blocks


def plan_migrations(
    snapshot: ClusterSnapshot,
    settings: ReschedulingSettings,
    moving: Collection[str],
    preempted: Mapping[str, bool],
    budget: int,
    watermark: float,
) -> list[MigrationPlan]:
    """Up to ``budget`` moves; ``moving``: request keys already migrating (left alone)."""
    decoders = [v for v in snapshot.usable() if v.can_decode and v.load is not None]
    plans: list[MigrationPlan] = []
    if len(decoders) < 2 or budget <= 0:
        return plans
    usage = {v.instance_id: virtual_usage(v, watermark) for v in decoders}
    busy = {p for p in moving}
    for source in sorted(decoders, key=lambda v: -usage[v.instance_id]):
        if len(plans) >= budget:
            break
        overloaded = usage[source.instance_id] > settings.migrate_out_usage
        if not (overloaded or preempted.get(source.instance_id)):
            continue
        target = min((v for v in decoders if v is not source), key=lambda v: usage[v.instance_id])
        plan = _one_move(source, target, usage, settings, busy)
        if plan is not None:
            plans.append(plan)
            busy.add(plan.request_key)
            usage[source.instance_id] -= plan.blocks / max(1, _total(source))
            usage[target.instance_id] += plan.blocks / max(1, _total(target))
    return plans


@runtime_checkable
class PlansMigrations(Protocol):
    """A dispatch policy with its own rescheduling rules (``adaptive``)."""

    def plan_migrations(
        self,
        snapshot: ClusterSnapshot,
        moving: Collection[str],
        preempted: Mapping[str, bool],
        budget: int,
    ) -> list[MigrationPlan]: ...


def plan_round(
    policy: object,
    snapshot: ClusterSnapshot,
    settings: ReschedulingSettings,
    moving: Collection[str],
    preempted: Mapping[str, bool],
    budget: int,
    watermark: float,
) -> list[MigrationPlan]:
    """One rescheduling round of either migrator: the dispatch policy's own rules where it
    has them (they must agree with where it places requests), else ``plan_migrations``."""
    if isinstance(policy, PlansMigrations):
        return policy.plan_migrations(snapshot, moving, preempted, budget)
    return plan_migrations(snapshot, settings, moving, preempted, budget, watermark)


def preempted_since(snapshot: ClusterSnapshot, last_counts: dict[str, int]) -> dict[str, bool]:
    """Which instances preempted requests since the last round (``plan_migrations``'s
    ``preempted``), from their cumulative counters; updates ``last_counts`` for the next
    round. An instance seen for the first time counts as not preempting."""
    preempted = {}
    for view in snapshot.instances:
        if view.load is not None:
            count = view.load.num_preemptions
            preempted[view.instance_id] = count > last_counts.get(view.instance_id, count)
            last_counts[view.instance_id] = count
    return preempted


def plan_drain(
    snapshot: ClusterSnapshot, source: str, request_keys: Sequence[str], watermark: float
) -> list[MigrationPlan]:
    """Where each request of a draining instance goes: spread, not all to one target.

    Each request goes to the decode-capable instance with the most virtual free blocks per
    request *after* the moves planned before it, so a drain of many requests fills the
    targets evenly. Requests the source does not report (not admitted yet) count one block.
    Requests that fit nowhere (no target) are left out.
    """
    view = snapshot.get(source)
    blocks = {
        r.request_key: r.num_blocks for r in (view.load.running if view and view.load else [])
    }
    targets = [v for v in snapshot.usable() if v.can_decode and v.instance_id != source]
    if not targets:
        return []
    free = {v.instance_id: v.virtual_free_blocks(watermark) for v in targets}
    count = {v.instance_id: v.num_requests for v in targets}
    plans = []
    # The largest first: they have the fewest places to fit.
    for key in sorted(request_keys, key=lambda k: -blocks.get(k, 1)):
        need = blocks.get(key, 1)
        target = max(targets, key=lambda v: free[v.instance_id] / (count[v.instance_id] + 1))
        plans.append(MigrationPlan(source, target.instance_id, key, need))
        free[target.instance_id] -= need
        count[target.instance_id] += 1
    return plans


def _total(view: InstanceView) -> int:
    return view.load.total_blocks if view.load else 0


def _one_move(
    source: InstanceView,
    target: InstanceView,
    usage: Mapping[str, float],
    settings: ReschedulingSettings,
    busy: Collection[str],
) -> MigrationPlan | None:
    gap = usage[source.instance_id] - usage[target.instance_id]
    if gap < settings.min_usage_gap or source.load is None:
        return None
    candidates = [
        r for r in source.load.running if r.request_key not in busy and r.num_output_tokens
    ]
    candidates.sort(key=lambda r: r.num_blocks, reverse=settings.pick == "most-blocks")
    for request in candidates:
        after_source = usage[source.instance_id] - request.num_blocks / max(1, _total(source))
        after_target = usage[target.instance_id] + request.num_blocks / max(1, _total(target))
        if after_target <= after_source:  # the gap narrows and does not invert
            return MigrationPlan(
                source.instance_id, target.instance_id, request.request_key, request.num_blocks
            )
    return None
