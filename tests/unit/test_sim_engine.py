"""One simulated vLLM engine against hand-computed step sequences, and its block accounting."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from pdserve.protocol.net import cdiv
from pdserve.sim.blocks import BlockPool
from pdserve.sim.engine import SimEngine
from pdserve.sim.epoch import epoch_length
from pdserve.sim.events import EventQueue
from pdserve.sim.legs import EngineConfig, Leg, LegState
from pdserve.sim.profile import StepCoefficients, StepProfile


def profile(**overrides: object) -> StepProfile:
    """Steps of 10 ms + 1 ms per prompt token + 2 ms per decoding sequence."""
    values: dict[str, object] = dict(
        name="test",
        source="derived",
        coefficients=StepCoefficients(
            base_s=0.010,
            prefill_token_s=0.001,
            attention_pair_s=0.0,
            decode_seq_s=0.002,
            decode_context_s=0.0,
        ),
        block_size=4,
        num_blocks=100,
        kv_bytes_per_token=1000,
        link_bandwidth_bytes_per_s=1e6,  # 1 ms per token
        link_latency_s=0.005,
        max_num_batched_tokens=8,
        max_num_seqs=4,
    )
    values.update(overrides)
    return StepProfile.model_validate(values)


@dataclass
class Owner:
    """Records what a leg's client would see."""

    times: list[float] = field(default_factory=list)
    finished_at: float | None = None
    pulled_at: float | None = None

    def leg_tokens(self, leg, first_at, last_at, steps, lo, hi) -> None:  # type: ignore[no-untyped-def]
        times = [first_at]
        for gap in steps[lo + 1 : hi]:
            times.append(times[-1] + gap)
        assert times[-1] == pytest.approx(last_at)
        self.times += times

    def leg_pulled(self, leg: Leg, at: float) -> None:
        self.pulled_at = at

    def leg_finished(self, leg: Leg, at: float) -> None:
        self.finished_at = at

    def leg_lost(self, leg: Leg, at: float) -> None:
        raise AssertionError("no instance fails here")


def engine(prof: StepProfile | None = None, **config: object) -> tuple[SimEngine, EventQueue]:
    prof = prof or profile()
    queue = EventQueue()
    return SimEngine("e", prof, EngineConfig.of(prof, **config), queue), queue


def rounded(times: list[float]) -> list[float]:
    return [round(t, 6) for t in times]


@pytest.mark.parametrize("epochs", [True, False])
def test_two_prompts_of_10_with_a_budget_of_8(epochs: bool) -> None:
    """Step 1: a's first 8 tokens (18 ms). Step 2: a's last 2 and b's first 6 (18 ms; a's
    first token). Step 3: a decodes, b's last 4 (16 ms; tokens of both). Then both decode
    (14 ms a step) until a has 5 tokens, then b alone (12 ms)."""
    e, queue = engine(epochs=epochs)
    a, b = Owner(), Owner()
    e.add(Leg("a", 10, 5, a), 0.0)
    e.add(Leg("b", 10, 5, b), 0.0)
    queue.run()
    assert rounded(a.times) == [0.036, 0.052, 0.066, 0.080, 0.094]
    assert rounded(b.times) == [0.052, 0.066, 0.080, 0.094, 0.106]
    assert a.finished_at == pytest.approx(0.094) and b.finished_at == pytest.approx(0.106)
    assert e.counters.steps == 7 and e.counters.prefill_tokens == 20
    assert e.pool.free == e.pool.total and e.idle()


def test_epochs_give_the_step_by_step_results() -> None:
    """Random arrivals, lengths and a tight pool (preemptions included): the same token
    times with epochs as computed one step at a time."""
    rng = random.Random(7)
    arrivals = [(rng.uniform(0, 2), rng.randint(1, 40), rng.randint(1, 60)) for _ in range(40)]
    results = []
    for epochs in (True, False):
        e, queue = engine(
            profile(num_blocks=30, max_num_batched_tokens=32, max_num_seqs=8), epochs=epochs
        )
        owners = [Owner() for _ in arrivals]
        for owner, (at, prompt, output) in zip(owners, arrivals, strict=True):
            leg = Leg("k", prompt, output, owner)
            queue.at(at, lambda arg: arg[0].add(arg[1], arg[2].now), (e, leg, queue))
        queue.run()
        assert all(len(o.times) == out for o, (_, _, out) in zip(owners, arrivals, strict=True))
        assert e.pool.free == e.pool.total
        results.append(([o.times for o in owners], e.counters.preemptions))
    (with_epochs, preempted), (step_by_step, preempted_too) = results
    assert preempted == preempted_too and preempted > 0, "the pool is small enough to preempt"
    for times, expected in zip(with_epochs, step_by_step, strict=True):
        assert times == pytest.approx(expected, abs=1e-9)


def test_preemption_recomputes_the_last_admitted_request() -> None:
    """Two sequences that cannot both grow: the later one is preempted, waits, recomputes
    prompt + output, and still produces exactly its tokens."""
    e, queue = engine(profile(num_blocks=6, max_num_batched_tokens=64))
    first, second = Owner(), Owner()
    e.add(Leg("first", 8, 12, first), 0.0)
    e.add(Leg("second", 8, 12, second), 0.0)
    queue.run()
    assert e.counters.preemptions >= 1
    assert len(first.times) == 12 and len(second.times) == 12
    assert first.finished_at is not None and second.finished_at is not None
    assert first.finished_at < second.finished_at, "the first admitted keeps running"
    assert e.pool.free == e.pool.total


def test_a_shared_prefix_is_computed_once() -> None:
    """The second request of a prefix group finds the group's 2 blocks cached and computes
    only its own 4 tokens; with the first request gone the blocks stay cached (free)."""
    chain = ((("prefix", 1), 2),)
    e, queue = engine(profile(max_num_batched_tokens=64))
    first = Owner()
    e.add(Leg("a", 12, 1, first, chain), 0.0)
    queue.run()
    assert e.counters.prefill_tokens == 12
    assert e.pool.free == e.pool.total and e.pool.evictable == 2
    second = Owner()
    e.add(Leg("b", 12, 1, second, chain), queue.now)
    queue.run()
    assert e.counters.prefill_tokens == 12 + 4
    assert first.times == [pytest.approx(0.022)]  # 10 ms + 12 tokens
    assert second.times == [pytest.approx(0.022 + 0.014)]  # 10 ms + 4 tokens


def test_cached_blocks_are_evicted_least_recently_freed_first() -> None:
    pool = BlockPool(10)
    for key in ("a", "b"):
        assert pool.allocate(3)
        assert pool.adopt(key, 0, 3) == 3
        pool.release(0)
        pool.unref(key)
    assert pool.free == 10 and pool.evictable == 6
    assert pool.allocate(6)  # 4 uncached, then 2 of a's blocks (freed first)
    assert pool.cached_blocks("a") == 1 and pool.cached_blocks("b") == 3
    assert pool.lookup((("a", 3),), 10) == [("a", 1)]
    pool.check([6])  # the 6 just allocated are a request's own


def test_a_pulled_request_computes_its_last_prompt_token_only() -> None:
    """A decode leg gets blocks for its prompt, pulls it (5 ms + 1 ms per token of whole
    blocks before the last token), is 'loading' meanwhile, then one 1-token step (11 ms).
    (Loads are all asynchronous here: ``sync_load_max_tokens`` 0.)"""
    prefill, queue = engine(profile(max_num_batched_tokens=64))
    exporter = Owner()
    export = Leg("r", 10, 1, exporter, keep=True)
    prefill.add(export, 0.0)
    queue.run()
    assert export.state is LegState.EXPORTED and prefill.pool.free == 100 - 3
    config = EngineConfig.of(prefill.profile, sync_load_max_tokens=0)
    decode = SimEngine("d", prefill.profile, config, queue)
    owner = Owner()
    leg = Leg("r", 10, 3, owner, source=export, source_tokens=10)
    start = queue.now
    decode.add(leg, start)
    queue.run(until=start + 0.001)
    report = decode.report(1)
    assert report.num_loading == 1 and report.num_waiting == 1 and report.free_blocks == 97
    queue.run()
    # ceil(9 / 4) = 3 blocks = 12 tokens pulled.
    assert owner.pulled_at == pytest.approx(start + 0.005 + 0.012)
    assert owner.times[0] == pytest.approx(start + 0.017 + 0.011)
    assert len(owner.times) == 3 and decode.counters.bytes_received == 12 * 1000
    prefill.release(export, queue.now)
    assert prefill.pool.free == prefill.pool.total and not prefill.exported


def test_the_load_report_is_the_instance_schedulers() -> None:
    e, queue = engine(profile(max_num_batched_tokens=8, max_num_seqs=2))
    owners = [Owner() for _ in range(3)]
    for i, owner in enumerate(owners):
        e.add(Leg(f"k{i}", 10, 50, owner), 0.0)
    queue.run(until=0.0)  # the first step is scheduled: k0's first chunk of 8
    report = e.report(7)
    assert report.seq == 7 and report.block_size == 4 and report.total_blocks == 100
    assert report.num_running == 1 and report.num_waiting == 2 and report.num_loading == 0
    assert report.free_blocks == 100 - 2
    # k0's 10 prompt tokens are not computed yet, k1 and k2 wait with theirs.
    assert report.waiting_prompt_tokens == 30 and report.waiting_blocks == 6
    assert [(r.request_key, r.num_tokens, r.num_blocks) for r in report.running] == [("k0", 10, 3)]


def test_a_waiting_requests_cached_prefix_is_not_queued_work() -> None:
    """As the instance's report: a waiting leg counts its tokens less the prefix hit it
    found as it joined the queue (here 2 of its 3 blocks; the rest, 4 tokens, is queued)."""
    chain = ((("prefix", 1), 2),)
    e, queue = engine(profile(max_num_batched_tokens=64, max_num_seqs=1))
    e.add(Leg("a", 12, 1, Owner(), chain), 0.0)
    queue.run()
    e.add(Leg("long", 20, 50, Owner()), queue.now)
    queue.run(until=queue.now)  # "long" runs (its 20 tokens in flight), holding the slot
    e.add(Leg("b", 12, 1, Owner(), chain), queue.now)
    e.add(Leg("c", 12, 1, Owner()), queue.now)
    report = e.report(1)
    assert report.num_waiting == 2 and report.waiting_prompt_tokens == 20 + 4 + 12
    queue.run()
    assert e.report(2).waiting_prompt_tokens == 0 and e.waiting_tokens == 0


def test_a_report_shows_the_state_at_its_own_time() -> None:
    """Reports are taken at report times (every 0.1 s): one read later shows the state
    then, not now, also in the middle of an epoch."""
    prof = profile(max_num_batched_tokens=64)
    queue = EventQueue()
    e = SimEngine("e", prof, EngineConfig.of(prof), queue, report_interval_s=0.1)
    owner = Owner()
    e.add(Leg("k", 4, 100, owner), 0.0)
    queue.run(until=0.25)
    e.touch(0.25)
    report = e.report_at(e.latest_tick(0.25))
    assert report is not None and report.seq == 3  # sent at 0.2
    tokens_at_report = sum(1 for t in owner.times if t <= 0.2)
    assert report.running[0].num_output_tokens == tokens_at_report
    assert tokens_at_report < len(owner.times)


@pytest.mark.parametrize("seqs", [5, 100])  # a Python loop, then numpy
def test_an_epoch_ends_before_the_step_that_finds_no_block(seqs: int) -> None:
    """Against a step-by-step count of the blocks each decode step takes."""
    rng = random.Random(seqs)
    running = []
    for _ in range(seqs):
        leg = Leg("k", rng.randint(1, 50), 400, Owner())
        leg.num_computed = leg.prompt_tokens + rng.randint(0, 20)
        leg.num_output = leg.num_computed - leg.prompt_tokens + 1
        leg.own_blocks = cdiv(leg.num_computed + 1, 4)  # step 1 has its blocks
        running.append(leg)
    for free in (0, 7, 40, 10_000):
        left, steps = free, 1
        while steps < 400 - max(leg.num_output for leg in running):
            needed = sum(
                cdiv(leg.num_computed + steps + 1, 4) - cdiv(leg.num_computed + steps, 4)
                for leg in running
            )
            if needed > left:
                break
            left -= needed
            steps += 1
        assert epoch_length(running, free, 4) == steps, free


def test_a_small_load_runs_in_the_step_that_admits_it() -> None:
    """Up to ``sync_load_max_tokens`` the pull is part of the admitting step (the
    connector's synchronous tail load): no loading phase, the busy engine's next step
    takes the pull (17 ms) plus its forward, and the first token comes at its end."""
    prof = profile(max_num_batched_tokens=64)
    queue = EventQueue()
    prefill = SimEngine("p", prof, EngineConfig.of(prof), queue)
    export = Leg("r", 10, 1, Owner(), keep=True)
    prefill.add(export, 0.0)
    queue.run()
    decode = SimEngine("d", prof, EngineConfig.of(prof, sync_load_max_tokens=64), queue)
    busy = Owner()
    start = queue.now
    decode.add(Leg("busy", 4, 50, busy), start)
    queue.run(until=start)  # its prefill step runs: 10 ms + 4 tokens
    owner = Owner()
    decode.add(Leg("r", 10, 3, owner, source=export, source_tokens=10), start)
    queue.run(until=start + 0.015)
    report = decode.report(1)
    assert report.num_loading == 0 and report.num_running == 2
    queue.run()
    second_step = 0.010 + 0.001 + 0.002  # r's last prompt token, busy decodes
    assert owner.times[0] == pytest.approx(start + 0.014 + 0.017 + second_step)
    assert owner.pulled_at == pytest.approx(owner.times[0])
    assert len(owner.times) == 3 and decode.counters.loads_ok == 1


@pytest.mark.parametrize("by_priority", [False, True])
def test_priority_scheduling_admits_the_most_important_waiting_request_first(
    by_priority: bool,
) -> None:
    """Three 8-token prompts waiting at once with a budget of 8 (one prompt a step, 18 ms):
    first come first served, or with vLLM's priority scheduling the one of priority -1
    (sent last) first, then the two of priority 0 in arrival order."""
    e, queue = engine(priority_scheduling=by_priority)
    owners = {name: Owner() for name in "abc"}
    for name, priority in (("a", 0), ("b", 0), ("c", -1)):
        leg = Leg(name, 8, 1, owners[name])
        leg.priority = priority
        e.add(leg, 0.0)
    queue.run()
    first = {name: owner.times[0] for name, owner in owners.items()}
    order = sorted(first, key=first.__getitem__)
    assert order == (["c", "a", "b"] if by_priority else ["a", "b", "c"])
    assert rounded([first[name] for name in order]) == [0.018, 0.036, 0.054]


@pytest.mark.parametrize("by_priority", [False, True])
def test_priority_scheduling_preempts_the_least_important_request(by_priority: bool) -> None:
    """Two sequences that cannot both grow, the less important one (priority 1, a 4-token
    prompt) admitted first: first come first served preempts the later one (the last
    running); priority scheduling the less important one, although it was scheduled ahead
    in that step (its tokens go back to the budget), so the important one finishes first."""
    e, queue = engine(
        profile(num_blocks=6, max_num_batched_tokens=64), priority_scheduling=by_priority
    )
    low, high = Owner(), Owner()
    low_leg = Leg("low", 4, 12, low)
    low_leg.priority = 1
    e.add(low_leg, 0.0)
    queue.at(0.001, lambda _: e.add(Leg("high", 8, 12, high), queue.now), None)
    queue.run()
    assert e.counters.preemptions >= 1
    assert len(low.times) == 12 and len(high.times) == 12
    assert low.finished_at is not None and high.finished_at is not None
    assert (high.finished_at < low.finished_at) is by_priority
    assert e.pool.free == e.pool.total and e.idle()
