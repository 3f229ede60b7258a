"""Conversations in the simulator: each turn's cached runs, turns that wait for the answer
before them, the prefix cache they hit, and the prefix-cache counters."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from pdserve.gateway.settings import GatewaySettings
from pdserve.scheduler.dispatch import DispatchSettings
from pdserve.scheduler.prefix_index import Tracking
from pdserve.scheduler.rescheduling import ReschedulingSettings
from pdserve.sim.cluster import SimCluster
from pdserve.sim.conversation import conversation_chain, conversation_chains
from pdserve.sim.gateway import Outcome
from pdserve.sim.legs import EngineConfig
from pdserve.sim.run import index_runs, sessions_for, simulate_point
from pdserve.sim.settings import SimSettings
from pdserve.workload.workloads import BenchRequest, WorkloadSettings, build_workload, split_warmup
from tests.unit.test_sim_cluster import PROFILE


def turn(k: int, prompt: int, answer: int = 2, conversation: int = 7) -> BenchRequest:
    return BenchRequest(
        [100] * prompt, prompt, answer, prefix_group=1, prefix_len=10,
        conversation=conversation, turn=k, user=[100] * 3, think_s=0.5 if k else 0.0,
    )  # fmt: skip


def test_a_turns_chain_is_the_system_prompt_then_every_turns_prompt_and_answer() -> None:
    # Blocks of 4: a 10-token system prompt (2 blocks), turns of 3 user and 2 answer tokens.
    first, second = turn(0, 13), turn(1, 18, answer=6)
    assert conversation_chain([first], 4) == (
        (("prefix", 1), 2),
        (("conv", 7, 0, "prompt"), 1),  # tokens 8-11 are full with the first user message
    )  # its answer (tokens 13-14) fills no block
    assert conversation_chain([first, second], 4) == (
        (("prefix", 1), 2),
        (("conv", 7, 0, "prompt"), 1),
        (("conv", 7, 1, "prompt"), 1),  # tokens 12-15: the first answer and the user's
        (("conv", 7, 1, "answer"), 1),  # 16-19 computed once 5 of the 6 answer tokens are
    )
    # The last answer token has no KV: an answer ending on a block boundary leaves the block
    # before it cached, not that one.
    assert conversation_chain([turn(0, 14)], 4)[-1] == (("conv", 7, 0, "prompt"), 1)
    chains = conversation_chains([first, second, turn(0, 13, conversation=8)], 4)
    assert chains[2] == ((("prefix", 1), 2), (("conv", 8, 0, "prompt"), 1))


def conversation_settings(**extra: object) -> SimSettings:
    values: dict[str, object] = {
        "workload": "conversations",
        "num_requests": 12,
        "turns": 4,
        "prefix_groups": 1,
        "prefix_len": 160,
        "input_len": 40,
        "output_len": 24,
        "think_time_s": 0.3,
        "max_context": 1024,
        "prefill": 0,
        "decode": 0,
        "both": 1,
        "rate": [2.0],
        "warm_tenants": False,
    }
    return SimSettings.model_validate(values | extra)


def test_turns_follow_their_answers_and_hit_what_the_turn_before_cached() -> None:
    settings = conversation_settings()
    requests = build_workload(WorkloadSettings.model_validate(settings.model_dump()))
    served = sessions_for(requests, [0.0, 1.0, 2.0], PROFILE.block_size)
    c = SimCluster(PROFILE, ["both"])
    c.run(served)
    assert all(s.outcome is Outcome.COMPLETED for s in served) and c.leaks() == []
    for earlier, later in itertools.pairwise(served):
        if later.follows:
            assert later.sent_at == pytest.approx(earlier.last_at + later.think_s)
    engine = c.engines["both-00"]
    queried = sum(r.input_len for r in requests)
    assert engine.counters.prefix_queries == queried
    # Only the first turn of the first conversation misses its system prompt; a later turn
    # finds every full block of the conversation so far (the instance never evicts here).
    found = 0
    for request in requests:
        if request.turn:
            found += (request.input_len - 40 - 1) // 16 * 16  # the last answer token: no KV
        elif request.conversation:
            found += 160
    assert engine.counters.prefix_hits == found
    engine.pool.check()


def test_a_turn_that_fails_ends_its_conversation() -> None:
    settings = conversation_settings(num_requests=8)
    requests = build_workload(WorkloadSettings.model_validate(settings.model_dump()))
    served = sessions_for(requests, [0.0, 0.0], PROFILE.block_size)
    # One session at a time and none queued: the second conversation's first turn is refused.
    c = SimCluster(PROFILE, ["both"], gateway=GatewaySettings(max_inflight=1, max_queued=0))
    c.run(served)
    outcomes = [s.outcome for s in served]
    assert outcomes == [Outcome.COMPLETED] * 4 + [Outcome.REJECTED] + [Outcome.NOT_SENT] * 3
    record = served[-1].record()
    assert not record.success and "not sent" in record.error
    assert c.leaks() == []


def test_simulate_point_warms_the_tenants_up_and_reports_the_hit_rate() -> None:
    settings = conversation_settings(num_requests=40, both=2, warm_tenants=True)
    dispatch = DispatchSettings(policy="round-robin")
    point = simulate_point(
        settings, PROFILE, dispatch, ReschedulingSettings(), GatewaySettings(), 2.0
    )
    assert point.summary.completed == point.summary.requests_sent == 40 and point.leaks == []
    assert point.cache.hit_rate is not None and 0.3 < point.cache.hit_rate < 1.0
    # The point's clock starts after the warm-up: its first request is sent at 0.
    assert min(r.start_s for r in point.records) == 0.0
    cold = simulate_point(
        settings.model_copy(update={"warm_tenants": False}),
        PROFILE, dispatch, ReschedulingSettings(), GatewaySettings(), 2.0,
    )  # fmt: skip
    assert cold.cache.hit_rate is not None and cold.cache.hit_rate < point.cache.hit_rate
    data = point.as_json()
    assert data["prefix_cache_hit_rate"] == point.cache.hit_rate
    assert data["prefix_cache_queries"] == sum(r.input_len for r in point.records)


def test_an_epochs_answer_blocks_are_cached_when_it_ends() -> None:
    """Decoding in epochs fills the answer's blocks without a step of its own: they are
    cached when the request ends, so the next turn finds them."""
    settings = conversation_settings(num_requests=2, turns=2, output_len=40)
    requests = build_workload(WorkloadSettings.model_validate(settings.model_dump()))
    served = sessions_for(requests, [0.0], PROFILE.block_size)
    c = SimCluster(PROFILE, ["both"], engine=EngineConfig.of(PROFILE, epochs=True))
    c.run(served)
    engine = c.engines["both-00"]
    conversation = requests[0].conversation
    # Its prompt fills blocks 10-11 (tokens 160-191), its answer 12-13 (up to token 223: its
    # last token, 239, has no KV).
    assert engine.pool.cached_blocks(("conv", conversation, 0, "answer")) == 2
    assert engine.counters.prefix_hits == 14 * 16


def test_the_sim_prefix_benchmark_writes_its_report(tmp_path: Path) -> None:
    from benchmark import sim_prefix

    argv = ["--instances", "2", "--tenants", "2", "--system-len", "64", "--user-len", "16"]
    argv += ["--answer-len", "8", "--num-requests", "12", "--rate", "1", "2", "--seeds", "0", "1"]
    argv += ["--profile", "smollm2-135m-cpu", "--max-context", "512", "--output", str(tmp_path)]
    assert sim_prefix.main(argv) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| 1 | round-robin | 2 | 12/12 |" in report and "Ratios: baseline /" in report
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data) == {"0", "1"} and {"round-robin", "pd", "1P1D"} <= set(data["0"])
    assert {"router-cache-aware", "router-cache-aware 1P1D"} <= set(data["0"])
    assert "cache-aware vs router-cache-aware, at least 1.3x:" in report
    assert all(p["prefix_cache_hit_rate"] is not None for p in data["0"]["round-robin"])
    assert (tmp_path / "sweep-seed1.png").read_bytes()[:4] == b"\x89PNG"


def test_the_prefix_index_holds_exactly_what_the_engines_cache() -> None:
    """Under cache-aware, every pool's cached and evicted blocks reach the control plane's
    prefix index as PrefixEvents: at any time it holds exactly each engine's cached runs,
    by the chain keys of their token ids, and the policy routes the tenants' turns to them."""
    settings = conversation_settings(
        num_requests=48, both=2, prefix_groups=3, warm_tenants=True, think_time_s=0.05
    )
    engine = EngineConfig.of(PROFILE, num_blocks=60)  # small: the pools evict
    dispatch = DispatchSettings(policy="cache-aware")
    _, requests = split_warmup(
        build_workload(WorkloadSettings.model_validate(settings.model_dump()))
    )
    c = SimCluster(PROFILE, ["both", "both"], dispatch=dispatch, engine=engine)
    assert c.outbox is not None
    served = sessions_for(requests, [0.5 * i for i in range(12)], 16, token_ids=True)
    index_runs(c.runs, requests, served, 16)
    index = c.control.prefix.index

    def same() -> None:
        c.sync(c.queue.now)
        for instance_id, e in c.engines.items():
            if index.tracking(instance_id) is not Tracking.EXACT:
                continue  # no event yet: what was routed there, approximately
            cached = {k for key, run in e.pool.runs.items() for k in c.runs[key][: run.blocks]}
            assert index.blocks(instance_id) == len(cached)

    c.run(served, after_each=same)
    assert all(s.outcome is Outcome.COMPLETED for s in served) and c.leaks() == []
    assert sum(e.counters.prefix_hits for e in c.engines.values()) > 0
    assert {index.tracking(i) for i in c.engines} == {Tracking.EXACT}
    # A later turn is matched where its conversation ran.
    last = served[-1]
    assert last.token_ids is not None
    assert index.match(last.token_ids, 16, c.queue.now).tokens(str(last.instance)) > 0
