"""A simulated cluster running the real control plane and policies: conservation, determinism,
back-pressure, live migration, failover, and the ``pdserve sim`` command."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pdserve.gateway.migration import MigrationStatus
from pdserve.gateway.settings import GatewaySettings
from pdserve.protocol.reports import Role
from pdserve.scheduler.dispatch import DispatchSettings
from pdserve.scheduler.rescheduling import ReschedulingSettings
from pdserve.scheduler.slo import SloSettings
from pdserve.sim.cluster import InstanceChange, SimCluster
from pdserve.sim.gateway import Outcome, Session
from pdserve.sim.legs import EngineConfig
from pdserve.sim.profile import StepCoefficients, StepProfile, save_profile
from pdserve.sim.run import SimPoint, simulate_point
from pdserve.sim.settings import SimSettings

PROFILE = StepProfile(
    name="test",
    source="derived",
    coefficients=StepCoefficients(
        base_s=0.010,
        prefill_token_s=0.0001,
        attention_pair_s=0.0,
        decode_seq_s=0.0005,
        decode_context_s=0.000001,
    ),
    block_size=16,
    num_blocks=400,
    kv_bytes_per_token=1000,
    link_bandwidth_bytes_per_s=1e8,
    link_latency_s=0.001,
    max_num_batched_tokens=512,
    max_num_seqs=32,
    max_model_len=4096,
)


def sessions(specs: list[tuple[float, int, int]]) -> list[Session]:
    return [
        Session(index=i, key=f"req-{i}", input_len=n_in, output_len=n_out, start_s=at)
        for i, (at, n_in, n_out) in enumerate(specs)
    ]


def poisson_like(n: int, gap: float, n_in: int = 200, n_out: int = 60) -> list[Session]:
    return sessions([(i * gap, n_in + 7 * (i % 5), n_out + 3 * (i % 7)) for i in range(n)])


def cluster(roles: list[Role], **kwargs: object) -> SimCluster:
    return SimCluster(PROFILE, roles, **kwargs)  # type: ignore[arg-type]


def test_every_request_completes_and_nothing_is_left_held() -> None:
    c = cluster(["prefill", "decode", "both"])
    served = poisson_like(60, 0.05)
    c.run(served)
    assert all(s.outcome is Outcome.COMPLETED for s in served)
    assert all(s.output == s.output_len for s in served)
    assert all(s.record().success and len(s.record().itl_s) == s.output_len - 1 for s in served)
    assert c.leaks() == []
    for engine in c.engines.values():
        engine.pool.check()


def test_blocks_stay_accounted_for_at_every_event() -> None:
    """Small pools (preemptions, holds), rescheduling and a failure: after every event each
    live engine's used blocks are exactly its legs' own blocks plus the cached runs in use,
    never negative nor above the total; at the end all are free."""
    c = cluster(
        ["prefill", "decode", "decode", "both"],
        engine=EngineConfig.of(PROFILE, num_blocks=80),
        rescheduling=ReschedulingSettings(rescheduling=True, reschedule_interval_s=0.1),
        changes=[InstanceChange(0.4, instance_id="decode-01")],
    )
    served = poisson_like(50, 0.01, n_in=150, n_out=120)
    for s in served[::3]:
        s.chain = ((("prefix", s.index % 2), 4),)

    def check() -> None:
        for engine in c.engines.values():
            if engine.alive:
                engine.check()

    c.run(served, after_each=check)
    assert sum(e.counters.preemptions for e in c.engines.values()) > 0
    assert all(s.outcome is Outcome.COMPLETED and s.output == s.output_len for s in served)
    assert c.leaks() == []


def test_a_disaggregated_request_is_prefilled_pulled_then_decoded() -> None:
    c = cluster(["prefill", "decode"])
    (session,) = sessions([(0.0, 300, 5)])
    c.run([session])
    prefill, decode = c.engines["prefill-00"], c.engines["decode-00"]
    assert prefill.counters.prefill_tokens == 300  # the whole prompt there
    assert decode.counters.prefill_tokens == 1  # only the last prompt token here
    pulled = (300 - 1) // 16 + 1  # whole blocks before the last token
    assert decode.counters.bytes_received == pulled * 16 * 1000
    assert prefill.counters.bytes_sent == decode.counters.bytes_received
    # TTFT: prefill step (10 ms + 30 ms), pull (1 ms + 304 tokens at 10 us), one step.
    first = session.record().ttft_s
    assert first == pytest.approx(0.040 + 0.001 + 0.00304 + 0.0101, abs=1e-6)
    assert c.leaks() == []


def test_each_decision_sees_reports_up_to_one_interval_old() -> None:
    """Staleness as in production: at every dispatch the control plane holds each
    instance's latest report, sent within the last report interval, not the state now."""
    c = cluster(["prefill", "decode", "decode"], report_interval_s=0.1)
    ages: list[float] = []
    stale: list[bool] = []
    original = c.control.dispatch

    def dispatch(estimate, key=None):  # type: ignore[no-untyped-def]
        now = c.queue.now
        for record in c.control.instances.values():
            assert record.last_report_at is not None and record.load is not None
            ages.append(now - record.last_report_at)
            engine = c.engines[record.info.instance_id]
            engine.touch(now)
            stale.append(record.load.num_running != len(engine.running))
        return original(estimate, key)

    c.control.dispatch = dispatch  # type: ignore[method-assign]
    c.run(poisson_like(60, 0.013))
    assert min(ages) >= 0 and max(ages) < 0.1 + 1e-9
    assert any(stale), "some decisions are taken on reports older than the engine's state"


def test_the_same_seed_gives_the_same_run() -> None:
    def run() -> list[tuple[float | None, list[float]]]:
        c = cluster(["prefill", "prefill", "decode", "decode"], seed=3)
        served = poisson_like(40, 0.02)
        c.run(served)
        return [(s.record().ttft_s, s.record().itl_s) for s in served]

    assert run() == run()


def placements(policy: str) -> Counter[str]:
    """Output tokens placed per instance, for requests alternating long and short outputs."""
    c = cluster(["both", "both"], dispatch=DispatchSettings(policy=policy))
    served = sessions([(0.05 * i, 50, 300 if i % 2 == 0 else 3) for i in range(20)])
    seen: Counter[str] = Counter()
    original = c.gateway.submit

    def submit(instance_id: str, leg, now: float) -> None:  # type: ignore[no-untyped-def]
        seen[instance_id] += leg.max_tokens
        original(instance_id, leg, now)

    c.gateway.submit = submit  # type: ignore[method-assign]
    c.run(served)
    assert all(s.outcome is Outcome.COMPLETED for s in served)
    return seen


def test_the_policy_decides_the_placement() -> None:
    """Round-robin takes turns blind to load: every long request lands on the same instance.
    Least-requests sees the long ones pile up there (load reports) and spreads them."""
    round_robin = placements("round-robin")
    assert sorted(round_robin.values()) == [10 * 3, 10 * 300]
    least = placements("least-requests")
    assert max(least.values()) < 10 * 300
    assert placements("pd") != round_robin


def test_full_decode_instances_hold_requests_instead_of_failing_them() -> None:
    """NoCapacity: requests wait at the gateway for a report with room, none fails."""
    small = EngineConfig.of(PROFILE, num_blocks=60)
    c = cluster(["prefill", "decode"], engine=small)
    served = sessions([(0.001 * i, 400, 40) for i in range(12)])
    c.run(served)
    assert c.gateway.counters.held > 0
    assert all(s.outcome is Outcome.COMPLETED for s in served)
    assert c.leaks() == []


def test_a_held_request_is_placed_whole_after_the_admission_wait() -> None:
    small = EngineConfig.of(PROFILE, num_blocks=60)
    c = cluster(["prefill", "decode"], engine=small, gateway=GatewaySettings(admission_wait_s=0.05))
    served = sessions([(0.001 * i, 400, 400) for i in range(6)])
    c.run(served)
    assert all(s.outcome is Outcome.COMPLETED for s in served)
    assert c.engines["decode-00"].counters.prefill_tokens > 6  # some prefilled there whole


def test_a_migration_moves_a_request_and_it_completes() -> None:
    c = cluster(["prefill", "decode", "decode"])
    (session,) = sessions([(0.0, 200, 300)])
    moves = []

    def migrate(_: object) -> None:
        moves.append(c.rescheduler.migrate(session, "decode-01", c.queue.now))

    c.queue.at(0.5 + c.warmup_s, migrate)
    c.run([session])
    (move,) = moves
    assert move.record.status is MigrationStatus.COMPLETED, move.record
    assert move.record.stages >= 1 and move.record.precopied_blocks > 0
    assert move.record.downtime_s is not None and 0 < move.record.downtime_s < 0.1
    assert session.instance == "decode-01" and session.output == 300
    assert len(session.record().itl_s) == 299
    assert c.engines["decode-01"].counters.prefill_tokens < 50, "pre-copied, not recomputed"
    assert c.leaks() == []


def test_rescheduling_migrates_off_an_overloaded_instance() -> None:
    """Two decode instances, all long requests on the first (round-robin's pair of turns
    puts them there), rescheduling on: requests move to the empty one."""
    c = cluster(
        ["prefill", "decode", "decode"],
        engine=EngineConfig.of(PROFILE, num_blocks=200),
        dispatch=DispatchSettings(policy="round-robin"),
        rescheduling=ReschedulingSettings(rescheduling=True, reschedule_interval_s=0.2),
    )
    served = sessions(
        [(0.02 * i, 100 if i % 2 == 0 else 8, 400 if i % 2 == 0 else 4) for i in range(12)]
    )
    c.run(served)
    assert all(s.outcome is Outcome.COMPLETED for s in served)
    assert c.rescheduler.counters.completed > 0
    assert c.leaks() == []


def test_an_instance_failing_fails_its_requests_over() -> None:
    c = cluster(
        ["prefill", "decode", "decode"],
        changes=[InstanceChange(0.3, instance_id="decode-00")],
    )
    served = poisson_like(30, 0.02, n_out=100)
    c.run(served)
    assert c.gateway.counters.failovers > 0
    assert all(s.outcome is Outcome.COMPLETED for s in served)
    assert all(s.output == s.output_len for s in served)
    record = c.control.instances.get("decode-00")  # forgotten after forget_after_s
    assert record is None or not record.healthy
    assert c.leaks() == []


def test_an_instance_joining_gets_work() -> None:
    c = cluster(["prefill", "decode"], changes=[InstanceChange(0.2, role="decode")])
    served = poisson_like(40, 0.02)
    c.run(served)
    assert "decode-01" in c.engines and c.engines["decode-01"].counters.steps > 0
    assert all(s.outcome is Outcome.COMPLETED for s in served)


def test_without_a_decode_instance_requests_are_served_whole_on_the_prefill_instance() -> None:
    """Roles are preferences (``--prefill 1 --decode 0``), as in the gateway: no 503; a
    decode instance that joins later takes the decodes of long prompts."""
    c = cluster(["prefill"], changes=[InstanceChange(1.0, role="decode")])
    served = poisson_like(40, 0.05)
    c.run(served)
    assert all(s.outcome is Outcome.COMPLETED for s in served)
    assert all(s.output == s.output_len and s.record().success for s in served)
    assert served[0].prefill_leg is None and served[-1].prefill_leg is not None
    assert c.engines["decode-00"].counters.steps > 0
    assert c.leaks() == []


def test_a_request_with_no_usable_instance_fails_with_no_instance() -> None:
    c = cluster(["prefill"], changes=[InstanceChange(0.1, instance_id="prefill-00")])
    (session,) = sessions([(2.0, 10, 10)])
    c.run([session])
    assert session.outcome is Outcome.NO_INSTANCE and not session.record().success


def point(
    tmp_path: Path, dispatch: DispatchSettings | None = None, **overrides: object
) -> SimPoint:
    path = tmp_path / "profile.json"
    save_profile(PROFILE, path)
    values: dict[str, object] = dict(
        prefill=1, decode=1, workload="fixed", input_len=100, output_len=20, num_requests=20
    )
    values.update(overrides)
    settings = SimSettings.model_validate({**values, "profile": str(path)})
    return simulate_point(
        settings,
        PROFILE,
        dispatch or DispatchSettings(),
        ReschedulingSettings(),
        GatewaySettings(),
        5.0,
    )


def test_a_point_is_summarized_by_the_benchmarks_code(tmp_path: Path) -> None:
    slo = SloSettings(ttft_ms=1000, tpot_ms=100)
    result = point(tmp_path, DispatchSettings(slo=slo))
    data = result.as_json()
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "decision_us"):
        assert set(data[name]) >= {"mean", "p50", "p99"}
    assert data["slo_attainment"] == 1.0 and data["goodput_rps"] > 0
    assert data["kv_transfer_bytes"] > 0 and data["simulated_s"] > 0 and data["wall_s"] > 0
    assert result.summary.completed == 20 and data["leaks"] == []


def test_pdserve_sim_writes_the_points(tmp_path: Path) -> None:
    from pdserve.cli import main

    profile = tmp_path / "profile.json"
    save_profile(PROFILE, profile)
    out = tmp_path / "sim.json"
    argv = [
        "sim", "--prefill", "1", "--decode", "2", "--policy", "least-requests",
        "--rescheduling", "--profile", str(profile), "--workload", "fixed",
        "--input-len", "64", "--output-len", "16", "--rate", "2", "8",
        "--num-requests", "15", "--seed", "1", "--json", str(out),
        "--plot", str(tmp_path / "plots"),
    ]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "plots" / "sweep.png").is_file()
    data = json.loads(out.read_text())
    assert [p["rate"] for p in data["points"]] == [2.0, 8.0]
    assert data["settings"]["dispatch"]["policy"] == "least-requests"
    assert data["settings"]["rescheduling"]["rescheduling"] is True
    assert all(p["completed"] == 15 for p in data["points"])


def test_a_report_made_from_the_epoch_is_the_one_a_pass_over_the_requests_makes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reports in the middle of an epoch come from what the epoch kept (``Epoch.intact``):
    each must equal the report a pass over the running requests makes, with small pools
    (block boundaries inside epochs, preemptions) and a migration's interruptions."""
    import pdserve.sim.engine as sim_engine
    from pdserve.sim.report import load_report

    made = Counter[str]()

    def checked(engine, seq, ahead=0, in_flight=False, epoch=None):  # type: ignore[no-untyped-def]
        report = load_report(engine, seq, ahead, in_flight, epoch)
        assert report == load_report(engine, seq, ahead, in_flight, None)
        made["epoch" if epoch is not None and epoch.intact else "pass"] += 1
        return report

    monkeypatch.setattr(sim_engine, "load_report", checked)
    c = cluster(
        ["prefill", "decode", "both", "both"],
        engine=EngineConfig.of(PROFILE, num_blocks=60),
        rescheduling=ReschedulingSettings(rescheduling=True),
    )
    c.run(poisson_like(80, 0.04, n_out=120))
    assert made["epoch"] > 100 and made["pass"] > 10, made


def classes_point(
    tmp_path: Path, priority_scheduling: bool, gateway: GatewaySettings | None = None
) -> SimPoint:
    """One colocated instance past its prefill capacity (20 req/s of 400-token prompts),
    30% of the requests high priority, a TTFT objective of 300 ms."""
    path = tmp_path / "profile.json"
    save_profile(PROFILE, path)
    settings = SimSettings.model_validate(
        dict(
            prefill=0, decode=0, both=1, workload="fixed", input_len=400, output_len=20,
            num_requests=120, high_priority_fraction=0.3, profile=str(path),
            priority_scheduling=priority_scheduling,
        )
    )  # fmt: skip
    return simulate_point(
        settings,
        PROFILE,
        DispatchSettings(slo=SloSettings(ttft_ms=300)),
        ReschedulingSettings(),
        gateway or GatewaySettings(),
        20.0,
    )


def test_priority_scheduling_serves_the_high_class_first(tmp_path: Path) -> None:
    """The same requests with the classes sent (vLLM's priority scheduling) and not: the
    high class's mean TTFT drops below the normal one's only when they are sent."""
    sent, alike = (classes_point(tmp_path, on) for on in (True, False))
    for result in (sent, alike):
        assert result.summary.completed == 120 and result.leaks == []
        assert result.as_json()["ttft_ms_high"]["n"] == sum(r.priority > 0 for r in result.records)
    high, normal = sent.summary.ttft_ms_high, sent.summary.ttft_ms_normal
    assert high is not None and normal is not None and high.mean is not None
    assert normal.mean is not None and high.mean < 0.5 * normal.mean
    high, normal = alike.summary.ttft_ms_high, alike.summary.ttft_ms_normal
    assert high is not None and normal is not None and high.mean is not None
    assert normal.mean is not None and 0.5 * normal.mean < high.mean < 2 * normal.mean


def test_shed_over_slo_refuses_only_the_lowest_class_while_queues_are_late(
    tmp_path: Path,
) -> None:
    """``--shed-over-slo --shed-priority 0``: normal requests are refused (429, counted as
    shed) while the instance's queue is past the TTFT objective; high-priority ones never;
    nothing leaks. Off (the default), nobody is shed."""
    gateway = GatewaySettings(shed_over_slo=True, shed_priority=0)
    shedding = classes_point(tmp_path, True, gateway)
    shed = [r for r in shedding.records if not r.success]
    assert shedding.shed == len(shed) > 0 and shedding.as_json()["shed"] == len(shed)
    assert all(r.priority == 0 and "TTFT SLO" in r.error for r in shed)
    assert all(r.success for r in shedding.records if r.priority > 0)
    assert shedding.leaks == []
    assert classes_point(tmp_path, True).shed == 0
