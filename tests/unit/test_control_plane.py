"""Instance registry and health, fed with messages directly (no sockets)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from pdserve.gateway.control_plane import ControlPlane
from pdserve.gateway.settings import GatewaySettings
from pdserve.protocol.reports import Deregister, LoadReport, Register
from pdserve.scheduler.dispatch import (
    Dispatch,
    DispatchSettings,
    NoInstance,
    PdPolicy,
    Serving,
    serving,
)
from pdserve.scheduler.snapshot import RequestEstimate


def register(name: str, role: str = "decode", pid: int = 1, incarnation: str = "") -> Register:
    return Register(
        instance_id=name,
        role=role,
        url=f"http://{name}",
        host="h",
        pid=pid,  # type: ignore[arg-type]
        model="m",
        kv_addresses=["tcp://x:1"],
        control_address=None,
        max_model_len=8192,
        started_at=0.0,
        incarnation=incarnation,
    )


def report(name: str, seq: int, running: int = 0, incarnation: str = "") -> LoadReport:
    return LoadReport(
        instance_id=name,
        seq=seq,
        num_running=running,
        num_waiting=0,
        num_loading=0,
        free_blocks=100,
        total_blocks=100,
        block_size=16,
        waiting_prompt_tokens=0,
        waiting_blocks=0,
        step_ms=0.0,
        prefill_tokens_per_s=0.0,
        num_preemptions=0,
        incarnation=incarnation,
    )


def plane(timeout: float = 1.0) -> ControlPlane:
    settings = GatewaySettings(heartbeat_timeout_s=timeout, dead_after_s=3.0, forget_after_s=10.0)
    return ControlPlane(settings, b"k", PdPolicy(DispatchSettings()))


def test_instance_is_usable_once_it_reports() -> None:
    cp = plane()
    cp.handle(register("d"), now=0.0)
    assert not cp.snapshot().usable()
    cp.handle(report("d", 1), now=0.1)
    assert [v.instance_id for v in cp.snapshot().usable()] == ["d"]


def test_short_silence_stops_new_work_long_silence_gives_up_once() -> None:
    cp = plane(timeout=1.0)
    down: list[str] = []
    cp.on_instance_down(down.append)
    cp.handle(register("d"), now=0.0)
    cp.handle(report("d", 1), now=0.0)
    cp.check_health(now=0.9)
    assert cp.instances["d"].healthy
    cp.check_health(now=1.2)
    assert not cp.instances["d"].healthy and down == [], "a hiccup is not a death"
    cp.handle(report("d", 2), now=1.4)
    assert cp.instances["d"].healthy
    cp.check_health(now=4.5)
    cp.check_health(now=4.6)
    assert not cp.instances["d"].healthy and down == ["d"]
    cp.handle(report("d", 3), now=5.0)
    assert cp.instances["d"].healthy
    cp.check_health(now=20.0)
    assert "d" not in cp.instances, "long-silent instances are forgotten"


def test_restarted_instance_counts_as_down_then_rejoins() -> None:
    cp = plane()
    down: list[str] = []
    cp.on_instance_down(down.append)
    cp.handle(register("d", pid=1), now=0.0)
    cp.handle(register("d", pid=1), now=1.0)
    assert down == []
    cp.handle(register("d", pid=2), now=2.0)
    assert down == ["d"] and cp.instances["d"].info.pid == 2


def test_deregister_removes_and_notifies() -> None:
    cp = plane()
    down: list[str] = []
    cp.on_instance_down(down.append)
    cp.handle(register("d"), now=0.0)
    cp.handle(Deregister(instance_id="d"), now=0.5)
    assert "d" not in cp.instances and down == ["d"]


def test_out_of_order_reports_are_ignored() -> None:
    cp = plane()
    cp.handle(register("d"), now=0.0)
    cp.handle(report("d", 5, running=5), now=0.0)
    cp.handle(report("d", 4, running=4), now=0.0)
    assert cp.instances["d"].load.num_running == 5


def test_dispatch_counts_pending_until_reports_catch_up() -> None:
    cp = plane()
    for name, role in (("p", "prefill"), ("d", "decode")):
        cp.handle(register(name, role), now=0.0)
        cp.handle(report(name, 1), now=0.0)
    choice = cp.dispatch(RequestEstimate(prompt_tokens=500, max_tokens=10))
    assert choice.prefill == "p"
    assert cp.instances["p"].pending_total(now=cp.instances["p"].pending[0][0]).prompt_tokens == 500
    later = cp.instances["p"].pending[0][0] + 1.0
    cp.handle(report("p", 2), now=later)
    assert cp.instances["p"].pending_total(now=later).requests == 0


def test_mark_broken_takes_an_instance_out_until_it_reports_again() -> None:
    cp = plane(timeout=0.5)
    cp.handle(register("d"), now=0.0)
    cp.handle(report("d", 1))
    cp.mark_broken("d")
    assert not cp.instances["d"].healthy


def test_a_restarted_instance_waits_for_its_registration() -> None:
    """Its engine reports before its HTTP server answers: no work, and the old one is down."""
    cp = plane()
    down: list[str] = []
    cp.on_instance_down(down.append)
    cp.handle(register("d", pid=1, incarnation="first"), now=0.0)
    cp.handle(report("d", 1, incarnation="first"), now=0.1)
    assert [v.instance_id for v in cp.snapshot().usable()] == ["d"]
    cp.handle(report("d", 1, incarnation="second"), now=0.2)  # the new engine, before HTTP
    assert cp.snapshot().usable() == [] and down == ["d"]
    cp.handle(report("d", 2, incarnation="second"), now=0.3)
    cp.check_health(now=0.35)
    assert cp.snapshot().usable() == [] and down == ["d"]  # told once
    cp.handle(register("d", pid=2, incarnation="second"), now=0.4)
    cp.handle(report("d", 3, incarnation="second"), now=0.5)
    assert [v.instance_id for v in cp.snapshot().usable()] == ["d"]


def full_report(name: str, seq: int, free: int) -> LoadReport:
    return msgspec.structs.replace(report(name, seq), free_blocks=free)


def full_decode_plane() -> tuple[ControlPlane, RequestEstimate]:
    """A prefill and a decode instance whose 2 free blocks cannot take a 500-token prompt."""
    cp = ControlPlane(GatewaySettings(), b"k", PdPolicy(DispatchSettings()))
    for name, role in (("p", "prefill"), ("d", "decode")):
        cp.handle(register(name, role))
        cp.handle(report(name, 1))
    cp.handle(full_report("d", 2, free=2))
    return cp, RequestEstimate(prompt_tokens=500, max_tokens=16)


def test_a_request_is_held_while_every_decode_instance_is_full() -> None:
    """Back-pressure (fault 8): no prefill until a decode instance has room for the KV."""
    asyncio.run(_held_until_room())


async def _held_until_room() -> None:
    cp, estimate = full_decode_plane()
    held = asyncio.create_task(cp.dispatch_with_room(estimate, "r1", wait_s=5.0))
    await asyncio.sleep(0.05)
    assert not held.done(), "placed although the decode instance is full"
    assert cp.held_requests == 1
    cp.handle(full_report("d", 3, free=90))
    choice, held_s = await asyncio.wait_for(held, 1.0)
    assert choice.prefill == "p" and choice.decode == "d" and held_s > 0
    assert cp.held_requests == 0
    assert "r1" in cp.instances["d"].held


def test_a_held_request_is_placed_whole_on_the_decode_instance_after_the_wait() -> None:
    asyncio.run(_placed_after_wait())


async def _placed_after_wait() -> None:
    cp, estimate = full_decode_plane()
    choice, held_s = await cp.dispatch_with_room(estimate, "r1", wait_s=0.1)
    assert choice.prefill is None and choice.decode == "d" and held_s >= 0.1
    assert cp.instances["d"].pending_total(cp.clock()).prompt_tokens == 500


def test_a_request_waits_for_instances_that_are_only_briefly_silent() -> None:
    """A starved host delays every instance's reports past the heartbeat timeout: the
    request waits for the next report instead of getting a 503."""
    asyncio.run(_waits_for_silent())


async def _waits_for_silent() -> None:
    cp = ControlPlane(
        GatewaySettings(heartbeat_timeout_s=1.0, dead_after_s=5.0),
        b"k",
        PdPolicy(DispatchSettings()),
    )
    start = cp.clock()
    cp.handle(register("d"), now=start)
    cp.handle(report("d", 1), now=start - 1.5)
    cp.check_health()
    assert not cp.instances["d"].healthy
    estimate = RequestEstimate(prompt_tokens=50, max_tokens=16)
    waiting = asyncio.create_task(cp.dispatch_with_room(estimate, "r1", wait_s=5.0))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    cp.handle(report("d", 2))
    choice, _ = await asyncio.wait_for(waiting, 1.0)
    assert choice.decode == "d"
    with pytest.raises(NoInstance):  # nothing to wait for: no instance at all
        await ControlPlane(
            GatewaySettings(), b"k", PdPolicy(DispatchSettings())
        ).dispatch_with_room(estimate, "r2", wait_s=5.0)


def test_a_cluster_without_decode_instances_serves_whole_on_its_prefill_instance() -> None:
    """``pdserve serve --prefill 1 --decode 0``: roles are preferences, not a 503."""
    cp = plane()
    cp.handle(register("p", "prefill"))
    assert cp.usable_models() == {} and cp.models() == {"m": 8192}  # not reported yet
    cp.handle(report("p", 1))
    long = RequestEstimate(prompt_tokens=2000, max_tokens=16)
    assert cp.dispatch(long, "r1") == Dispatch(decode="p")
    assert cp.dispatch_decode(long, prefilled=True) == "p"  # its decode instance went away
    assert cp.usable_models() == {"m": 8192}
    assert serving(cp.snapshot()) is Serving.COLOCATED_ONLY
    cp.handle(register("d", "decode"))
    cp.handle(report("d", 1))
    assert cp.dispatch(long, "r2") == Dispatch(decode="d", prefill="p")
    assert cp.dispatch_decode(long, prefilled=True) == "d"
    assert serving(cp.snapshot()) is Serving.DISAGGREGATED
