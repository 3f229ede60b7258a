"""The rescheduling policy over synthetic snapshots: who moves, where, and when not."""

from __future__ import annotations

from pdserve.protocol.reports import LoadReport, RunningRequest
from pdserve.scheduler.rescheduling import (
    ReschedulingSettings,
    plan_drain,
    plan_migrations,
    virtual_usage,
)
from pdserve.scheduler.snapshot import ClusterSnapshot, InstanceView


def view(
    name: str,
    free: int,
    total: int = 100,
    running: list[RunningRequest] | None = None,
    role: str = "decode",
    waiting_blocks: int = 0,
) -> InstanceView:
    report = LoadReport(
        instance_id=name,
        seq=1,
        num_running=len(running or []),
        num_waiting=0,
        num_loading=0,
        free_blocks=free,
        total_blocks=total,
        block_size=16,
        waiting_prompt_tokens=0,
        waiting_blocks=waiting_blocks,
        step_ms=50.0,
        prefill_tokens_per_s=0.0,
        num_preemptions=0,
        running=running or [],
    )
    return InstanceView(name, role, load=report)  # type: ignore[arg-type]


def req(key: str, blocks: int, output: int = 5) -> RunningRequest:
    return RunningRequest(
        request_key=key, num_tokens=blocks * 16, num_blocks=blocks, num_output_tokens=output
    )


SETTINGS = ReschedulingSettings(rescheduling=True, migrate_out_usage=0.7, min_usage_gap=0.15)


def plan(snapshot: ClusterSnapshot, **kwargs: object) -> list:
    args = dict(moving=set(), preempted={}, budget=4, watermark=0.0)
    args.update(kwargs)
    return plan_migrations(snapshot, SETTINGS, **args)  # type: ignore[arg-type]


def test_moves_the_smallest_request_from_the_fullest_to_the_emptiest() -> None:
    snapshot = ClusterSnapshot(
        (
            view("hot", free=10, running=[req("big", 40), req("small", 5), req("mid", 20)]),
            view("cold", free=90),
            view("warm", free=50),
        )
    )
    (move,) = plan(snapshot, budget=1)
    assert (move.source, move.target, move.request_key) == ("hot", "cold", "small")


def test_most_blocks_first_when_asked() -> None:
    snapshot = ClusterSnapshot(
        (view("hot", 10, running=[req("big", 30), req("small", 5)]), view("cold", 95))
    )
    settings = SETTINGS.model_copy(update={"pick": "most-blocks"})
    (move,) = plan_migrations(snapshot, settings, set(), {}, 1, 0.0)
    assert move.request_key == "big"


def test_no_move_that_would_invert_the_imbalance() -> None:
    snapshot = ClusterSnapshot((view("hot", 20, running=[req("huge", 70)]), view("cold", 70)))
    assert plan(snapshot) == []


def test_balanced_or_lightly_loaded_clusters_stay_put() -> None:
    assert plan(ClusterSnapshot((view("a", 20, running=[req("x", 5)]), view("b", 25)))) == []
    assert plan(ClusterSnapshot((view("a", 50, running=[req("x", 5)]), view("b", 95)))) == []


def test_preemptions_trigger_a_move_below_the_usage_threshold() -> None:
    snapshot = ClusterSnapshot((view("a", 50, running=[req("x", 5)]), view("b", 95)))
    (move,) = plan(snapshot, preempted={"a": True})
    assert move.request_key == "x"


def test_queued_demand_counts_as_usage() -> None:
    snapshot = ClusterSnapshot(
        (view("a", 60, running=[req("x", 5)], waiting_blocks=40), view("b", 95))
    )
    assert virtual_usage(snapshot.instances[0], 0.0) == 0.8
    assert [m.request_key for m in plan(snapshot)] == ["x"]


def test_requests_already_moving_or_without_output_are_left_alone() -> None:
    snapshot = ClusterSnapshot(
        (
            view("hot", 10, running=[req("moving", 5), req("queued", 5, output=0), req("ok", 6)]),
            view("cold", 95),
        )
    )
    assert [m.request_key for m in plan(snapshot, moving={"moving"})] == ["ok"]


def test_one_move_per_source_per_round_within_the_budget() -> None:
    snapshot = ClusterSnapshot(
        (
            view("hot1", 5, running=[req(f"a{i}", 3) for i in range(10)]),
            view("hot2", 10, running=[req(f"b{i}", 3) for i in range(10)]),
            view("cold", 95),
            view("p", 100, role="prefill"),
        )
    )
    moves = plan(snapshot, budget=4)
    assert [m.source for m in moves] == ["hot1", "hot2"]
    assert {m.target for m in moves} == {"cold"}, "prefill instances never take a decode"
    assert len(plan(snapshot, budget=1)) == 1
    assert plan(snapshot, budget=0) == []


def test_drain_spreads_requests_over_the_targets() -> None:
    running = [req(f"r{i}", 10) for i in range(6)]
    snapshot = ClusterSnapshot(
        (view("leaving", free=20, running=running), view("a", free=80), view("b", free=80))
    )
    plans = plan_drain(snapshot, "leaving", [r.request_key for r in running], watermark=0.0)
    targets = [p.target for p in plans]
    assert sorted(p.request_key for p in plans) == [f"r{i}" for i in range(6)]
    assert targets.count("a") == targets.count("b") == 3


def test_drain_prefers_room_and_honours_the_watermark() -> None:
    snapshot = ClusterSnapshot(
        (view("leaving", free=20, running=[req("x", 10)]), view("a", free=60), view("b", free=50))
    )
    assert plan_drain(snapshot, "leaving", ["x"], watermark=0.0)[0].target == "a"
    # A watermark reserves a share of each target's total: a smaller pool loses its lead.
    small = ClusterSnapshot(
        (
            view("leaving", free=20, running=[req("x", 10)]),
            view("a", free=60, total=1000),
            view("b", free=50, total=100),
        )
    )
    assert plan_drain(small, "leaving", ["x"], watermark=0.05)[0].target == "b"


def test_drain_without_a_target_plans_nothing() -> None:
    snapshot = ClusterSnapshot((view("leaving", free=20, running=[req("x", 10)]),))
    assert plan_drain(snapshot, "leaving", ["x"], watermark=0.0) == []
