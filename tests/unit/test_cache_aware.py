"""The cache-aware policy over synthetic snapshots and prefix matches (``scheduler.cache_aware``).

Every instance here prefills 2000 tokens/s (the default rate) and reports 50 ms steps, so a
``decode`` instance may compute up to 100 uncached tokens of a request it decodes.
"""

from __future__ import annotations

import pytest

from pdserve.scheduler.dispatch import (
    CacheAwareDispatch,
    Dispatch,
    DispatchSettings,
    NoCapacity,
    NoInstance,
    PdPolicy,
    PrefixAwarePolicy,
    make_policy,
)
from pdserve.scheduler.prefix_index import NO_MATCH, PrefixMatch
from pdserve.scheduler.snapshot import ClusterSnapshot, RequestEstimate
from tests.unit.test_dispatch import view

PROMPT = RequestEstimate(prompt_tokens=1000, max_tokens=100)
LONG = RequestEstimate(prompt_tokens=3000, max_tokens=100)


def policy(**settings: object) -> CacheAwareDispatch:
    return CacheAwareDispatch(DispatchSettings(policy="cache-aware", **settings))  # type: ignore[arg-type]


def held(**tokens: int) -> PrefixMatch:
    return PrefixMatch(tokens, frozenset(), 16)


def cluster(*views: object) -> ClusterSnapshot:
    return ClusterSnapshot(views)  # type: ignore[arg-type]


def test_it_is_selected_by_name_and_load_only_policies_read_no_prefix_index() -> None:
    assert isinstance(make_policy(DispatchSettings(policy="cache-aware")), CacheAwareDispatch)
    assert isinstance(policy(), PrefixAwarePolicy)
    for name in ("pd", "round-robin", "least-requests", "adaptive"):
        assert not isinstance(make_policy(DispatchSettings(policy=name)), PrefixAwarePolicy)


def test_without_a_cached_prefix_it_places_as_pd_does() -> None:
    snap = cluster(
        view("p1", "prefill", queued_tokens=4000),
        view("p2", "prefill"),
        view("d1", "decode", running=4, free=500),
        view("d2", "decode", running=1, free=900),
    )
    pd = PdPolicy(DispatchSettings())
    assert policy().choose(snap, PROMPT) == pd.choose(snap, PROMPT) == Dispatch("d2", "p2")
    short = RequestEstimate(prompt_tokens=10, max_tokens=10)
    assert policy().choose(snap, short) == pd.choose(snap, short) == Dispatch("d2")


def test_prefill_sticks_to_the_instance_holding_the_prefix() -> None:
    snap = cluster(view("p1", "prefill"), view("p2", "prefill"), view("d", "decode"))
    choice = policy().choose_cached(snap, LONG, held(p2=2992))
    assert choice == Dispatch("d", "p2", cached_tokens=2992)


def test_a_hot_prefix_spreads_once_its_holder_is_saturated() -> None:
    """The holder keeps it while its queue is longer than the other's by less than twice the
    cached tokens: the time the other would take to compute them again, and as long again
    for the other prefixes the copy would evict (``copy_s``)."""
    match = held(p2=2000)

    def prefill_with_queue(queued: int) -> str | None:
        snap = cluster(
            view("p1", "prefill"), view("p2", "prefill", queued_tokens=queued), view("d", "decode")
        )
        return policy().choose_cached(snap, LONG, match).prefill

    assert prefill_with_queue(3900) == "p2"
    assert prefill_with_queue(4100) == "p1"


def test_the_saturation_threshold_follows_the_measured_prefill_rates() -> None:
    """p2 computes 4000 tokens/s: its queue of 3000 tokens waits 0.75 s, less than p1's
    1.5 s of recomputing the 3000-token prompt, so p2 keeps it; at 1000 tokens/s (3 s) not."""
    match = held(p2=2000)
    for rate, chosen in ((4000.0, "p2"), (1000.0, "p1")):
        snap = cluster(
            view("p1", "prefill"),
            view("p2", "prefill", queued_tokens=3000, rate=rate),
            view("d", "decode"),
        )
        assert policy().choose_cached(snap, LONG, match).prefill == chosen


def test_decode_prefers_the_instance_that_holds_the_prefix() -> None:
    """d1 has the most free memory, but d2 holds a third of the prompt: its connector pulls
    only the other two thirds. Both are chosen together: prefill on p, decode on d2."""
    snap = cluster(
        view("p", "prefill"),
        view("d1", "decode", free=1000),
        view("d2", "decode", free=600),
    )
    assert policy().choose_cached(snap, LONG, held(d2=1000)) == Dispatch("d2", "p")
    # With the prefill instance holding it too, both holders.
    assert policy().choose_cached(snap, LONG, held(d2=1000, p=1000)) == Dispatch(
        "d2", "p", cached_tokens=1000
    )


def test_a_decode_holder_past_the_balance_leaves_the_decode_to_the_best_instance() -> None:
    snap = cluster(
        view("p", "prefill"),
        view("d1", "decode", free=1000),
        view("d2", "decode", free=400, running=1),  # 200 blocks per request: < 0.5 x 1000
    )
    assert (
        policy(cache={"decode_balance": 0.5}).choose_cached(snap, LONG, held(d2=1000)).decode
        == "d1"
    )
    assert policy(cache={"decode_balance": 0.1}).choose_cached(snap, LONG, held(d2=1000)) == (
        Dispatch("d2", "p")
    )
    # By default (0) a holder with room keeps the decode however much freer another is.
    assert policy().choose_cached(snap, LONG, held(d2=1000)) == Dispatch("d2", "p")


def test_a_decode_holder_without_room_for_the_request_is_not_chosen() -> None:
    snap = cluster(
        view("p", "prefill"),
        view("d1", "decode", free=1000),
        view("d2", "decode", free=100, total=1000),  # the prompt needs 188 blocks
    )
    assert policy().choose_cached(snap, LONG, held(d2=2992)).decode == "d1"


def test_the_small_uncached_part_is_computed_on_the_decode_holder() -> None:
    """d holds 992 of 1000 tokens: computing 8 there beats a prefill elsewhere and a pull."""
    snap = cluster(view("p", "prefill"), view("d", "decode"))
    assert policy().choose_cached(snap, PROMPT, held(d=992, p=992)) == Dispatch(
        "d", cached_tokens=992
    )


def test_a_large_uncached_part_is_not_computed_on_a_decode_instance() -> None:
    """600 uncached tokens are more than one 50 ms step of d (100 tokens): the prefill
    instance computes them although d's own queue is as empty."""
    snap = cluster(view("p", "prefill"), view("d", "decode"))
    assert policy().choose_cached(snap, PROMPT, held(d=400)) == Dispatch("d", "p")


def test_a_decode_instance_prefills_when_the_prefill_pool_is_saturated() -> None:
    snap = cluster(view("p", "prefill", queued_tokens=100_000), view("d", "decode"))
    assert policy().choose_cached(snap, PROMPT, NO_MATCH) == Dispatch("d")


def test_a_both_instance_holding_the_prefix_serves_the_request_whole() -> None:
    snap = cluster(
        view("p", "prefill"), view("b1", "both", free=1000), view("b2", "both", free=800)
    )
    assert policy().choose_cached(snap, LONG, held(b2=2992)) == Dispatch("b2", cached_tokens=2992)


def test_without_decode_instances_the_holder_serves_it_whole() -> None:
    snap = cluster(view("p1", "prefill"), view("p2", "prefill", queued_tokens=500))
    assert policy().choose_cached(snap, LONG, held(p2=2992)) == Dispatch("p2", cached_tokens=2992)
    with pytest.raises(NoInstance):
        policy().choose_cached(cluster(view("p", "prefill", healthy=False)), LONG, NO_MATCH)


def test_a_full_decode_instance_holds_a_disaggregated_request() -> None:
    snap = cluster(view("p", "prefill"), view("d", "decode", free=50, total=1000))
    with pytest.raises(NoCapacity):
        policy().choose_cached(snap, LONG, held(p=1000))


def test_holders_that_are_not_usable_are_ignored() -> None:
    snap = cluster(
        view("p1", "prefill"),
        view("p2", "prefill", accepting=False),
        view("d", "decode"),
    )
    assert policy().choose_cached(snap, LONG, held(p2=2992, gone=2992)) == Dispatch("d", "p1")
