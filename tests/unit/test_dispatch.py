"""Placement policies over synthetic cluster snapshots."""

from __future__ import annotations

import pytest

from pdserve.protocol.reports import LoadReport
from pdserve.scheduler.dispatch import (
    Dispatch,
    DispatchPolicy,
    DispatchSettings,
    LeastRequestsPolicy,
    NoCapacity,
    NoInstance,
    PdPolicy,
    RoundRobinPolicy,
    Serving,
    make_policy,
    serving,
)
from pdserve.scheduler.snapshot import ClusterSnapshot, InstanceView, Pending, RequestEstimate


def load(
    name: str,
    *,
    running: int = 0,
    waiting: int = 0,
    free: int = 1000,
    total: int = 1000,
    queued_tokens: int = 0,
    waiting_blocks: int = 0,
    rate: float = 0.0,
) -> LoadReport:
    return LoadReport(
        instance_id=name,
        seq=1,
        num_running=running,
        num_waiting=waiting,
        num_loading=0,
        free_blocks=free,
        total_blocks=total,
        block_size=16,
        waiting_prompt_tokens=queued_tokens,
        waiting_blocks=waiting_blocks,
        step_ms=50.0,
        prefill_tokens_per_s=rate,
        num_preemptions=0,
    )


def view(name: str, role: str, **kwargs: object) -> InstanceView:
    healthy = bool(kwargs.pop("healthy", True))
    accepting = bool(kwargs.pop("accepting", True))
    pending = kwargs.pop("pending", Pending())
    return InstanceView(
        name,
        role,
        healthy=healthy,
        accepting=accepting,  # type: ignore[arg-type]
        load=load(name, **kwargs),
        pending=pending,
    )  # type: ignore[arg-type]


LONG = RequestEstimate(prompt_tokens=1000, max_tokens=100)
SHORT = RequestEstimate(prompt_tokens=10, max_tokens=100)


def test_decode_goes_where_most_memory_per_request_is_left() -> None:
    snap = ClusterSnapshot(
        (
            view("p", "prefill"),
            view("d1", "decode", running=10, free=500),
            view("d2", "decode", running=2, free=300),
        )
    )
    assert PdPolicy(DispatchSettings()).choose(snap, LONG).decode == "d2"


def test_queued_demand_counts_against_free_blocks() -> None:
    snap = ClusterSnapshot(
        (
            view("p", "prefill"),
            view("d1", "decode", running=1, free=800, waiting=2, waiting_blocks=700),
            view("d2", "decode", running=1, free=400),
        )
    )
    assert PdPolicy(DispatchSettings()).choose(snap, LONG).decode == "d2"


def test_prefill_goes_to_the_shortest_estimated_wait() -> None:
    snap = ClusterSnapshot(
        (
            view("p1", "prefill", queued_tokens=4000, rate=2000.0),
            view("p2", "prefill", queued_tokens=3000, rate=500.0),
            view("d", "decode"),
        )
    )
    choice = PdPolicy(DispatchSettings()).choose(snap, LONG)
    assert choice.prefill == "p1" and choice.disaggregated


def test_short_prompts_are_prefilled_on_the_decode_instance() -> None:
    snap = ClusterSnapshot((view("p", "prefill"), view("d", "decode")))
    policy = PdPolicy(DispatchSettings(short_prompt_tokens=64))
    assert policy.choose(snap, SHORT).prefill is None
    assert policy.choose(snap, LONG).prefill == "p"


def test_saturated_prefill_pool_spills_onto_an_idle_decoder() -> None:
    snap = ClusterSnapshot(
        (
            view("p", "prefill", queued_tokens=20000, rate=1000.0),
            view("d", "decode"),
        )
    )
    assert PdPolicy(DispatchSettings(prefill_saturation_s=2.0)).choose(snap, LONG).prefill is None
    relaxed = PdPolicy(DispatchSettings(prefill_saturation_s=60.0))
    assert relaxed.choose(snap, LONG).prefill == "p"


def test_both_instances_serve_whole_requests() -> None:
    snap = ClusterSnapshot((view("p", "prefill"), view("b", "both")))
    assert PdPolicy(DispatchSettings()).choose(snap, LONG).prefill is None


def test_unhealthy_draining_and_silent_instances_are_skipped() -> None:
    snap = ClusterSnapshot(
        (
            view("p", "prefill", healthy=False),
            view("d1", "decode", accepting=False),
            view("d2", "decode", running=50),
            InstanceView("d3", "decode"),  # registered, never reported
        )
    )
    choice = PdPolicy(DispatchSettings()).choose(snap, LONG)
    assert choice.decode == "d2" and choice.prefill is None


def all_policies() -> tuple[DispatchPolicy, ...]:
    return PdPolicy(DispatchSettings()), RoundRobinPolicy(), LeastRequestsPolicy()


def test_without_a_usable_decoder_every_policy_serves_whole_on_a_prefill_instance() -> None:
    """Roles are preferences: a prefill instance serves the whole request, no 503."""
    snap = ClusterSnapshot((view("p", "prefill"), view("d", "decode", healthy=False)))
    for policy in all_policies():
        for request in (LONG, SHORT):
            assert policy.choose(snap, request) == Dispatch(decode="p")


def test_the_fallback_picks_the_best_instance_by_each_policys_measure() -> None:
    snap = ClusterSnapshot(
        (
            view("p1", "prefill", running=1, queued_tokens=8000, rate=1000.0),
            view("p2", "prefill", running=5, queued_tokens=100, rate=1000.0),
            view("d", "decode", accepting=False),
        )
    )
    assert PdPolicy(DispatchSettings()).choose(snap, LONG).decode == "p2"  # shortest wait
    assert LeastRequestsPolicy().choose(snap, LONG).decode == "p1"  # fewest requests
    turns = RoundRobinPolicy()
    assert [turns.choose(snap, LONG).decode for _ in range(3)] == ["p1", "p2", "p1"]


def test_no_usable_instance_at_all_raises() -> None:
    snap = ClusterSnapshot(
        (view("p", "prefill", healthy=False), InstanceView("d", "decode"))  # d never reported
    )
    for policy in all_policies():
        with pytest.raises(NoInstance, match="no healthy instance"):
            policy.choose(snap, LONG)


def test_serving_says_what_the_usable_instances_can_serve() -> None:
    def of(*views: InstanceView) -> Serving:
        return serving(ClusterSnapshot(views))

    assert of(view("p", "prefill"), view("d", "decode")) is Serving.DISAGGREGATED
    assert of(view("p", "prefill"), view("d", "decode", healthy=False)) is Serving.COLOCATED_ONLY
    assert of(view("b", "both")) is Serving.COLOCATED_ONLY
    assert of(view("p", "prefill", healthy=False)) is Serving.NONE


def test_pending_dispatches_spread_a_burst() -> None:
    busy = Pending(requests=5, prompt_tokens=5000, blocks=400)
    snap = ClusterSnapshot(
        (
            view("p1", "prefill", pending=busy),
            view("p2", "prefill", queued_tokens=100),
            view("d1", "decode", pending=busy),
            view("d2", "decode", running=1),
        )
    )
    choice = PdPolicy(DispatchSettings()).choose(snap, LONG)
    assert (choice.prefill, choice.decode) == ("p2", "d2")


def test_round_robin_takes_turns_blindly() -> None:
    snap = ClusterSnapshot((view("a", "both", running=100), view("b", "both")))
    policy = RoundRobinPolicy()
    assert [policy.choose(snap, LONG).decode for _ in range(4)] == ["a", "b", "a", "b"]


def test_round_robin_turns_each_pool_separately() -> None:
    snap = ClusterSnapshot((view("p", "prefill"), view("d1", "decode"), view("d2", "decode")))
    policy = RoundRobinPolicy()
    choices = [policy.choose(snap, LONG) for _ in range(4)]
    assert [c.decode for c in choices] == ["d1", "d2", "d1", "d2"]
    assert {c.prefill for c in choices} == {"p"}


def test_least_requests() -> None:
    snap = ClusterSnapshot(
        (
            view("p1", "prefill", running=3),
            view("p2", "prefill", running=1),
            view("d1", "decode", running=2),
            view("d2", "decode", running=4),
        )
    )
    choice = LeastRequestsPolicy().choose(snap, LONG)
    assert (choice.prefill, choice.decode) == ("p2", "d1")


def test_make_policy() -> None:
    assert isinstance(make_policy(DispatchSettings(policy="round-robin")), RoundRobinPolicy)
    assert isinstance(make_policy(DispatchSettings()), PdPolicy)


def test_pd_holds_a_disaggregated_request_when_every_decode_instance_is_full() -> None:
    """Fault 8: prefilling it would leave its export waiting for a decode slot until its
    lease ran out; NoCapacity tells the gateway to hold it instead."""
    full = ClusterSnapshot(
        (view("p", "prefill"), view("d1", "decode", free=5), view("d2", "decode", free=3))
    )
    with pytest.raises(NoCapacity) as raised:
        PdPolicy(DispatchSettings()).choose(full, LONG)
    assert raised.value.decode == "d1" and raised.value.need_blocks > 5
    roomy = ClusterSnapshot((view("p", "prefill"), view("d1", "decode", free=900)))
    assert PdPolicy(DispatchSettings()).choose(roomy, LONG) == Dispatch("d1", "p")


def test_normal_requests_leave_the_priority_reserve_to_high_priority_ones() -> None:
    """With ``priority_kv_reserve`` 0.5 a normal request is held where a high-priority one of
    the same size is pulled at once; without a reserve both are placed."""
    settings = DispatchSettings(priority_kv_reserve=0.5)
    snap = ClusterSnapshot((view("p", "prefill"), view("d", "decode", free=400)))  # 40% free
    normal = RequestEstimate(prompt_tokens=1000, max_tokens=16)  # 63 blocks of 16
    high = RequestEstimate(prompt_tokens=1000, max_tokens=16, priority=1)
    with pytest.raises(NoCapacity):
        PdPolicy(settings).choose(snap, normal)
    assert PdPolicy(settings).choose(snap, high) == Dispatch("d", "p")
    assert PdPolicy(DispatchSettings()).choose(snap, normal) == Dispatch("d", "p")
    roomy = ClusterSnapshot((view("p", "prefill"), view("d", "decode", free=600)))
    assert PdPolicy(settings).choose(roomy, normal) == Dispatch("d", "p")


def test_a_normal_request_too_large_for_the_unreserved_blocks_may_use_the_reserve() -> None:
    """It would wait for ever outside the reserve: it waits for room as without one."""
    settings = DispatchSettings(priority_kv_reserve=0.5)
    large = RequestEstimate(prompt_tokens=12_000, max_tokens=16)  # 751 blocks > 490
    empty = ClusterSnapshot((view("p", "prefill"), view("d", "decode", free=1000)))
    assert PdPolicy(settings).choose(empty, large) == Dispatch("d", "p")
    busy = ClusterSnapshot((view("p", "prefill"), view("d", "decode", free=700)))
    with pytest.raises(NoCapacity):
        PdPolicy(settings).choose(busy, large)


def test_pd_places_a_request_larger_than_any_instance_instead_of_holding_it_forever() -> None:
    huge = RequestEstimate(prompt_tokens=20_000, max_tokens=16)  # 1251 blocks of 16 > 1000
    snap = ClusterSnapshot((view("p", "prefill"), view("d", "decode", free=10)))
    assert PdPolicy(DispatchSettings()).choose(snap, huge).decode == "d"
