"""vllm-router's ``cache_aware`` re-created (``scheduler.router_cache_aware``): its three rules
over synthetic snapshots, and its index through the control plane (routed prompts only, no
KV events, no TTL, not bounded by the instances' KV caches)."""

from __future__ import annotations

import math

from pdserve.scheduler.dispatch import (
    Dispatch,
    DispatchSettings,
    PrefixAwarePolicy,
    RouterCacheAwareDispatch,
    make_policy,
)
from pdserve.scheduler.prefix_index import NO_MATCH, PrefixMatch
from pdserve.scheduler.snapshot import ClusterSnapshot, RequestEstimate
from tests.unit.test_dispatch import view
from tests.unit.test_prefix_routing import PROMPT, SYSTEM, events, plane, request, stored

ASK = RequestEstimate(prompt_tokens=1000, max_tokens=100)


def policy(**router: object) -> RouterCacheAwareDispatch:
    return RouterCacheAwareDispatch(DispatchSettings(policy="router-cache-aware", router=router))  # type: ignore[arg-type]


def held(**tokens: int) -> PrefixMatch:
    return PrefixMatch(tokens, frozenset(tokens), 16)


def both(*loads: tuple[str, int]) -> ClusterSnapshot:
    return ClusterSnapshot(tuple(view(name, "both", running=n) for name, n in loads))


def test_it_is_selected_by_name_and_keeps_its_index_as_the_router_does() -> None:
    chosen = make_policy(DispatchSettings(policy="router-cache-aware"))
    assert isinstance(chosen, RouterCacheAwareDispatch)
    assert isinstance(chosen, PrefixAwarePolicy)
    assert not chosen.tracking.kv_events
    assert chosen.tracking.approximate_ttl_s == math.inf
    assert not chosen.tracking.bounded_by_capacity


def test_the_longest_match_above_the_threshold_wins() -> None:
    snap = both(("a", 0), ("b", 0))
    assert policy().choose_cached(snap, ASK, held(a=100, b=320)) == Dispatch("b")
    # 320 of 1000 tokens is not above a threshold of 0.4: the smallest tree (a tie: a) wins.
    assert policy(cache_threshold=0.4).choose_cached(snap, ASK, held(b=320)) == Dispatch("a")


def test_without_a_match_the_instance_with_the_smallest_tree_wins() -> None:
    snap = both(("a", 0), ("b", 0), ("c", 0))
    router = policy()
    assert router.choose_cached(snap, ASK, NO_MATCH).decode == "a"
    assert router.choose_cached(snap, ASK, NO_MATCH).decode == "b"
    # Only the unmatched part grows a tree: c's tree is 0, b's 1000, a's 1000 + 100.
    small = RequestEstimate(prompt_tokens=200, max_tokens=10)
    assert router.choose_cached(snap, small, held(a=100)).decode == "a"
    assert router.choose_cached(snap, ASK, NO_MATCH).decode == "c"
    assert router.choose_cached(snap, ASK, NO_MATCH).decode == "b"


def test_imbalance_sends_the_request_to_the_least_loaded_whatever_it_holds() -> None:
    match = held(a=990)
    # 65 more requests and more than 1.5x: imbalanced.
    assert policy().choose_cached(both(("a", 75), ("b", 10)), ASK, match) == Dispatch("b")
    # 64 more is within the absolute threshold; 3x fewer alone is not enough.
    assert policy().choose_cached(both(("a", 74), ("b", 10)), ASK, match) == Dispatch("a")
    # 65 more but less than 1.5x: within the relative threshold.
    assert policy().choose_cached(both(("a", 200), ("b", 135)), ASK, match) == Dispatch("a")


def test_with_prefill_instances_each_pool_is_chosen_by_the_same_rule() -> None:
    snap = ClusterSnapshot(
        (view("p1", "prefill"), view("p2", "prefill"), view("d1", "decode"), view("d2", "decode"))
    )
    choice = policy().choose_cached(snap, ASK, held(p2=900, d2=900))
    assert choice == Dispatch("d2", "p2")


def test_the_control_plane_tracks_routed_prompts_only_without_ttl_or_capacity() -> None:
    cp, clock = plane("router-cache-aware")
    assert cp.dispatch(PROMPT) == Dispatch("d", "p1")  # no match: the smallest tree
    # p2's events say it holds the prefix: the router does not read them.
    cp.handle(events("p2", 1, stored(SYSTEM)), now=0.0)
    assert not cp.prefix.match(PROMPT, 0.0).get("p2")
    clock.now = 10_000.0  # no TTL: what was routed stays
    assert cp.dispatch(PROMPT).prefill == "p1"  # 2000 tokens: more than p1's 100 blocks
    other = request(list(range(50_000, 50_500)))
    assert cp.dispatch(other).prefill == "p2"  # p2's tree is the smaller
    # The shared prefix (992 of 2000 tokens) is still matched on p1 alone.
    assert cp.dispatch(request(SYSTEM + [9] * 1008)).prefill == "p1"
