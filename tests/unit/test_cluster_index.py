"""The incremental snapshot: the index and the control plane's cached views answer exactly
what a scan of freshly made views would (issue 12, item 8)."""

from __future__ import annotations

import random
from collections.abc import Callable

import msgspec
import pytest

from pdserve.gateway.control_plane import HELD_MAX_AGE_S, PENDING_MAX_AGE_S, ControlPlane
from pdserve.gateway.settings import GatewaySettings
from pdserve.protocol.reports import ROLES, LoadReport
from pdserve.scheduler.dispatch import (
    DispatchPolicy,
    DispatchSettings,
    LeastRequestsPolicy,
    NoCapacity,
    NoInstance,
    PdPolicy,
    RoundRobinPolicy,
)
from pdserve.scheduler.index import _POOLS_OF, ClusterIndex
from pdserve.scheduler.snapshot import (
    POOLS,
    ClusterSnapshot,
    InstanceView,
    Pending,
    Ranking,
    RequestEstimate,
    in_pool,
)
from tests.unit.test_control_plane import register, report


def load(name: str, rng: random.Random) -> LoadReport:
    return msgspec.structs.replace(
        report(name, 1),
        num_running=rng.randrange(4),
        free_blocks=rng.randrange(0, 101, 10),  # coarse: ties happen
        waiting_prompt_tokens=rng.randrange(0, 3000, 500),
        prefill_tokens_per_s=rng.choice((0.0, 1000.0, 2000.0)),
    )


def random_view(name: str, rng: random.Random) -> InstanceView:
    return InstanceView(
        name,
        rng.choice(ROLES),
        healthy=rng.random() < 0.8,
        accepting=rng.random() < 0.9,
        load=load(name, rng) if rng.random() < 0.9 else None,
        pending=Pending(rng.randrange(3), 0, rng.randrange(0, 20, 5)),
    )


def test_the_pools_of_a_view_are_those_in_pool_says() -> None:
    rng = random.Random(0)
    for _ in range(200):
        view = random_view("x", rng)
        assert _POOLS_OF[view.usable, view.role] == tuple(p for p in POOLS if in_pool(view, p))


def check(snapshot: ClusterSnapshot, rankings: list[Ranking]) -> None:
    """Every answer of an indexed snapshot is the scan's over its own views."""
    plain = ClusterSnapshot(snapshot.instances)
    for pool in POOLS:
        assert snapshot.pool(pool) == plain.pool(pool)
        assert snapshot.ids(pool) == plain.ids(pool)
    for ranking in rankings:
        assert snapshot.best(ranking) is plain.best(ranking)
    for view in snapshot.instances:
        assert snapshot.get(view.instance_id) is view
    assert snapshot.get("nobody") is None


@pytest.mark.parametrize("seed", range(5))
def test_the_index_answers_as_a_scan_through_random_changes(seed: int) -> None:
    rng = random.Random(seed)
    policy = PdPolicy(DispatchSettings())
    rankings = [
        policy.decode_ranking,
        policy.prefill_ranking,
        LeastRequestsPolicy.decode_ranking,
        LeastRequestsPolicy.prefill_ranking,
    ]
    index = ClusterIndex()
    names = [f"i{n}" for n in range(12)]
    kept: list[tuple[ClusterSnapshot, tuple[InstanceView, ...]]] = []
    for step in range(600):
        name = rng.choice(names)
        if rng.random() < 0.1:
            index.remove(name)
        else:
            index.set(name, random_view(name, rng))
        if rng.random() < 0.3:
            index.tidy()
        snapshot = index.snapshot()
        check(snapshot, rankings)
        if step % 50 == 0:
            kept.append((snapshot, snapshot.instances))
    for snapshot, instances in kept:  # older snapshots keep their views and still answer
        assert snapshot.instances == instances
        check(snapshot, rankings)


def test_an_unchanged_index_hands_out_the_same_snapshot() -> None:
    index = ClusterIndex()
    index.set("a", random_view("a", random.Random(1)))
    first = index.snapshot()
    assert index.snapshot() is first
    index.set("b", random_view("b", random.Random(2)))
    assert index.snapshot() is not first and len(first.instances) == 1


def fresh_views(cp: ControlPlane, now: float) -> tuple[InstanceView, ...]:
    """The views as the control plane made them before it kept them: every entry's age
    checked now, every total summed again."""
    views = []
    for record in cp.instances.values():
        total = Pending()
        for t, p in record.pending:
            if now - t < PENDING_MAX_AGE_S:
                total = total + p
        for t, p in record.held.values():
            if now - t < HELD_MAX_AGE_S:
                total = total + p
        views.append(
            InstanceView(
                instance_id=record.info.instance_id,
                role=record.info.role,
                healthy=record.healthy,
                accepting=not record.draining,
                load=record.load,
                pending=total,
                max_model_len=record.info.max_model_len,
            )
        )
    return tuple(views)


# Instances by role: a mix, and one decoder among prefill instances (its drains and
# silences leave no decode-capable instance, where every policy falls back to any role).
MIXES = {"mixed": ["prefill", "decode", "both"] * 3, "one decoder": ["prefill"] * 5 + ["decode"]}


@pytest.mark.parametrize("policy", ["pd", "round-robin", "least-requests"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_the_kept_snapshot_is_the_one_made_afresh(policy: str, seed: int, mix: str) -> None:
    """Reports, dispatches, held and started decode legs, drains, silences and entries
    ageing out, in random order: the snapshot is always what the scan would make, and a
    policy decides on it as on the scan's."""
    rng = random.Random(seed)
    clock = [0.0]
    settings = GatewaySettings(heartbeat_timeout_s=1.0, dead_after_s=3.0, forget_after_s=30.0)
    makers: dict[str, Callable[[], DispatchPolicy]] = {
        "pd": lambda: PdPolicy(DispatchSettings()),
        "round-robin": RoundRobinPolicy,
        "least-requests": LeastRequestsPolicy,
    }
    make = makers[policy]
    cp = ControlPlane(settings, b"k", make(), clock=lambda: clock[0])
    twin = make()  # the same policy, deciding on the scan's snapshot
    names = [f"{role}-{n}" for n, role in enumerate(MIXES[mix])]
    seqs = dict.fromkeys(names, 0)
    keys: list[tuple[str, str]] = []
    fallbacks = 0  # requests served whole on a prefill instance
    for name in names:
        cp.handle(register(name, name.split("-")[0]), now=0.0)
    for step in range(800):
        action = rng.random()
        name = rng.choice(names)
        if action < 0.35:
            seqs[name] += 1
            cp.handle(msgspec.structs.replace(load(name, rng), seq=seqs[name]), now=clock[0])
        elif action < 0.7:
            estimate = RequestEstimate(rng.choice((10, 500, 3000)), 16)
            key = f"r{step}" if rng.random() < 0.7 else None
            expected: object
            try:
                expected = twin.choose(ClusterSnapshot(fresh_views(cp, clock[0])), estimate)
            except (NoInstance, NoCapacity) as e:
                expected = type(e)
            try:
                choice = cp.dispatch(estimate, key)
            except (NoInstance, NoCapacity) as e:
                assert expected is type(e)
            else:
                assert choice == expected
                fallbacks += choice.decode.startswith("prefill")
                if key is not None and choice.prefill is not None:
                    keys.append((key, choice.decode))
        elif action < 0.8 and keys:
            key, decode = keys.pop(rng.randrange(len(keys)))
            if rng.random() < 0.7:
                cp.decode_started(key, decode)
            else:
                cp.forget_held(key)
        elif action < 0.85 and name in cp.instances:
            cp.instances[name].draining = not cp.instances[name].draining
        elif action < 0.9:
            cp.check_health()
        else:
            clock[0] += rng.choice((0.01, 0.1, 0.5, 2.5, HELD_MAX_AGE_S))
        assert cp.snapshot().instances == fresh_views(cp, clock[0])
    assert fallbacks or mix != "one decoder", "the fallback was never exercised"


def test_a_view_made_by_of_is_the_constructors() -> None:
    rng = random.Random(3)
    for _ in range(20):
        made = random_view("x", rng)
        fast = InstanceView.of(
            made.instance_id,
            made.role,
            made.healthy,
            made.accepting,
            made.load,
            made.pending,
            made.max_model_len,
        )
        assert fast == made and repr(fast) == repr(made)
