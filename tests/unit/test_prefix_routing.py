"""The control plane's prefix index (``gateway.prefix_events``): instances' signed prefix
events in, cache-aware dispatch out; gaps, restarts, and the approximate fallback."""

from __future__ import annotations

from typing import Any

import msgspec

from pdserve.gateway.control_plane import ControlPlane
from pdserve.gateway.openai_api import CompletionRequest, Service, estimate_of
from pdserve.gateway.settings import GatewaySettings
from pdserve.protocol.prefix import Cleared, PrefixEvents, Removed, Stored, chain_keys
from pdserve.protocol.reports import ControlMessage, Deregister
from pdserve.protocol.wire import Codec
from pdserve.scheduler.dispatch import Dispatch, DispatchSettings, make_policy
from pdserve.scheduler.snapshot import RequestEstimate
from tests.unit.test_control_plane import register, report

BS = 16
SYSTEM = list(range(1000, 1000 + 62 * BS))  # a 992-token shared prefix
TAIL = [7] * 1008  # 2000 tokens in all


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def plane(policy: str = "cache-aware") -> tuple[ControlPlane, Clock]:
    clock = Clock()
    settings = GatewaySettings(heartbeat_timeout_s=5.0, dead_after_s=10.0, forget_after_s=60.0)
    cp = ControlPlane(settings, b"k", make_policy(DispatchSettings(policy=policy)), clock=clock)
    for name, role in (("p1", "prefill"), ("p2", "prefill"), ("d", "decode")):
        cp.handle(register(name, role, incarnation="i1"), now=0.0)
        cp.handle(report(name, 1, incarnation="i1"), now=0.0)
    return cp, clock


def stored(tokens: list[int], first_hash: int = 1) -> Stored:
    keys = chain_keys(tokens, BS)
    return Stored(list(range(first_hash, first_hash + len(keys))), keys)


def events(name: str, seq: int, *batch: Any, full: bool = False, inc: str = "i1") -> PrefixEvents:
    return PrefixEvents(name, inc, seq, BS, list(batch), full=full)


def request(tokens: list[int]) -> RequestEstimate:
    return RequestEstimate(len(tokens), 16, prompt_token_ids=tuple(tokens))


PROMPT = request(SYSTEM + TAIL)


def test_a_signed_batch_round_trips_through_the_control_envelope() -> None:
    codec: Codec[Any] = Codec(ControlMessage, b"k")
    batch = events("p2", 1, stored(SYSTEM), Removed([3]), Cleared())
    assert codec.decode(codec.encode(batch)) == batch


def test_prefill_goes_to_the_instance_whose_events_show_the_prefix() -> None:
    cp, _ = plane()
    assert cp.dispatch(PROMPT) == Dispatch("d", "p1")  # nothing cached anywhere yet
    cp.handle(events("p2", 1, stored(SYSTEM)), now=0.0)
    choice = cp.dispatch(PROMPT)
    assert choice == Dispatch("d", "p2", cached_tokens=992)
    # Only the uncached part counts as work sent there.
    assert cp.snapshot().get("p2").pending.prompt_tokens == 2000 - 992  # type: ignore[union-attr]


def test_the_prefix_spreads_when_its_holder_reports_a_long_queue() -> None:
    cp, _ = plane()
    cp.handle(events("p2", 1, stored(SYSTEM)), now=0.0)
    # It holds 992 tokens: it keeps them while its queue is under twice that (cache_aware's
    # "copies are priced twice").
    queued = msgspec.structs.replace(report("p2", 2, incarnation="i1"), waiting_prompt_tokens=1500)
    cp.handle(queued, now=0.0)
    assert cp.dispatch(PROMPT).prefill == "p2"
    busy = msgspec.structs.replace(report("p2", 3, incarnation="i1"), waiting_prompt_tokens=2500)
    cp.handle(busy, now=0.0)
    assert cp.dispatch(PROMPT).prefill == "p1"


def test_a_removal_or_a_clear_in_the_events_ends_the_stickiness() -> None:
    cp, _ = plane()
    cp.handle(events("p2", 1, stored(SYSTEM)), now=0.0)
    cp.handle(events("p2", 2, Removed([1])), now=0.0)  # its first block
    assert cp.prefix.match(PROMPT, 0.0).tokens("p2") == 0
    # The first block computed again: the blocks after it that stayed cached hit again.
    cp.handle(events("p2", 3, stored(SYSTEM[:BS], first_hash=100)), now=0.0)
    assert cp.prefix.match(PROMPT, 0.0).tokens("p2") == 992
    cp.handle(events("p2", 4, Cleared()), now=0.0)
    assert not cp.prefix.match(PROMPT, 0.0)


def test_a_gap_drops_the_instance_entries_until_a_full_picture_comes() -> None:
    cp, _ = plane()
    cp.handle(events("p2", 1, stored(SYSTEM)), now=0.0)
    cp.handle(events("p2", 3, stored([5] * BS, first_hash=50)), now=0.0)  # 2 was lost
    assert cp.prefix.gaps == 1
    assert cp.prefix.match(PROMPT, 0.0).tokens("p2") == 0
    cp.handle(events("p2", 4, stored(SYSTEM), full=True), now=0.0)
    assert cp.prefix.match(PROMPT, 0.0).tokens("p2") == 992
    cp.handle(events("p2", 4, Cleared()), now=0.0)  # a repeat: ignored
    assert cp.prefix.match(PROMPT, 0.0).tokens("p2") == 992
    assert cp.prefix.gaps == 1


def test_a_gateway_that_starts_while_an_instance_runs_rebuilds_from_its_full_picture() -> None:
    cp, _ = plane()
    cp.handle(events("p2", 41, stored(SYSTEM), full=True), now=0.0)
    assert cp.prefix.gaps == 0
    assert cp.prefix.match(PROMPT, 0.0).tokens("p2") == 992


def test_a_restarted_instance_starts_empty() -> None:
    cp, _ = plane()
    cp.handle(events("p2", 1, stored(SYSTEM)), now=0.0)
    cp.handle(events("p2", 1, Cleared(), inc="i2"), now=0.0)
    assert not cp.prefix.match(PROMPT, 0.0)
    cp.handle(events("p2", 2, stored(SYSTEM), inc="i2"), now=0.0)
    # Its registration (after its first events) keeps what this incarnation said.
    cp.handle(register("p2", "prefill", pid=2, incarnation="i2"), now=0.0)
    assert cp.prefix.match(PROMPT, 0.0).tokens("p2") == 992


def test_an_instance_that_leaves_is_forgotten() -> None:
    cp, _ = plane()
    cp.handle(events("p2", 1, stored(SYSTEM)), now=0.0)
    cp.handle(Deregister("p2"), now=0.0)
    assert not cp.prefix.match(PROMPT, 0.0)


def test_instances_without_events_are_tracked_by_what_was_routed_there() -> None:
    cp, clock = plane()
    first = cp.dispatch(PROMPT)
    assert first == Dispatch("d", "p1")
    match = cp.prefix.match(request(SYSTEM + [9] * 30), clock.now)
    assert match.tokens("p1") == 992 and match.tokens("d") == 992
    assert match.approximate == {"p1", "d"}
    # p1's pending work was its whole prompt; once its report shows it done, a request with
    # the same prefix and a short tail computes the tail on d, which holds the rest.
    cp.handle(report("p1", 2, incarnation="i1"), now=1.0)
    cp.handle(report("d", 2, incarnation="i1"), now=1.0)
    cp.decode_started("k", "d")
    clock.now = 1.0
    assert cp.dispatch(request(SYSTEM + [9] * 30)) == Dispatch("d", cached_tokens=992)
    clock.now = 1000.0  # aged out
    assert not cp.prefix.match(PROMPT, clock.now)


def test_other_policies_ignore_prefix_events_and_place_as_before() -> None:
    cp, _ = plane("pd")
    cp.handle(events("p2", 1, stored(SYSTEM)), now=0.0)
    assert len(cp.prefix.index) == 0 and cp.prefix.batches == 0
    assert cp.dispatch(PROMPT) == Dispatch("d", "p1")


def test_a_token_id_prompt_brings_its_ids_to_the_index() -> None:
    ids = estimate_of(CompletionRequest(prompt=[1, 2, 3]), Service()).prompt_token_ids
    assert ids == (1, 2, 3)
    assert estimate_of(CompletionRequest(prompt="text"), Service()).prompt_token_ids is None
