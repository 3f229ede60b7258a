"""Faults between the gateway's legs (fake instances, no vLLM): where a request's decode leg
goes while its prefill runs, long prompts, instances that leave, failover during migration,
and which KV exports the gateway releases.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import zmq

from pdserve.cluster.processes import free_port
from pdserve.gateway import upstream
from pdserve.gateway.control_plane import ControlPlane
from pdserve.gateway.openai_api import parse_request
from pdserve.gateway.session import CUT_FALLBACK_S, Cut, RequestSession, SessionRegistry
from pdserve.gateway.settings import GatewaySettings
from pdserve.kv.messages import KVMessage, Pin, Pinned, Unpin
from pdserve.protocol.reports import Deregister
from pdserve.protocol.wire import Codec
from pdserve.scheduler.dispatch import DispatchSettings, PdPolicy
from pdserve.scheduler.snapshot import RequestEstimate
from tests.unit.gateway_harness import MODEL, SECRET, FakeInstance, LiveGateway

LONG_PROMPT = list(range(1, 201))  # past short_prompt_tokens: prefilled on a prefill instance


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.01)


def on_loop(gateway: LiveGateway, fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` on the gateway's event loop (the control plane is not thread-safe)."""

    async def call() -> Any:
        return fn()

    return gateway.run(call())


def report_all(gateway: LiveGateway) -> None:
    on_loop(gateway, lambda: [gateway.ctx.control.handle(i.report()) for i in gateway.instances])


def post(gateway: LiveGateway, body: dict[str, Any], timeout_s: float = 60) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/completions", json=body, timeout=timeout_s)


def completion(prompt: list[int], **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 3, **extra}


def record_releases(gateway: LiveGateway) -> list[str]:
    released: list[str] = []
    gateway.ctx.kv.release = lambda addresses, transfer_id: released.append(transfer_id)  # type: ignore[method-assign]
    return released


def leg_sources(instance: FakeInstance) -> list[str | None]:
    """The transfer id each streamed leg on the instance was told to pull, or None."""
    sources = []
    for body in instance.received:
        params = (body.get("kv_transfer_params") or {}).get("pdserve") or {}
        sources.append((params.get("source") or {}).get("transfer_id"))
    return sources


def assert_openai_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]


# --- fault 3: a request in its prefill phase counts on its decode instance ----------------------


def test_a_burst_of_long_prompts_spreads_over_the_decode_instances() -> None:
    """Load reports arriving while the prefills run must not erase the decode instances'
    share: each decode instance sees its requests only once their prefill is done."""
    prefill = FakeInstance("prefill-0", "prefill")
    prefill.exports = True
    prefill.hold = asyncio.Event()
    decoders = [FakeInstance(f"decode-{i}", "decode") for i in range(3)]
    with LiveGateway([prefill, *decoders]) as gateway, ThreadPoolExecutor(6) as pool:
        futures = []
        for i in range(6):
            futures.append(pool.submit(post, gateway, completion(LONG_PROMPT)))
            wait_until(lambda n=i + 1: len(prefill.received) == n, what="the prefill leg")
            time.sleep(0.2)  # past the control plane's grace for unreported dispatches
            report_all(gateway)
        gateway.loop.call_soon_threadsafe(prefill.hold.set)
        responses = [f.result(timeout=30) for f in futures]
        assert [r.status_code for r in responses] == [200] * 6
        assert [len(d.received) for d in decoders] == [2, 2, 2]
        # Once the decode legs ran, nothing is held for them any more.
        assert all(not gateway.ctx.control.instances[d.name].held for d in decoders)


# --- fault 5: long prompts (every leg returns token ids) ----------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_200k_token_prompt_goes_through_both_legs(stream: bool) -> None:
    """The first event carries all 200k prompt token ids (~1.2 MB on one SSE line)."""
    prefill, decode = FakeInstance("prefill-0", "prefill"), FakeInstance("decode-0", "decode")
    prefill.exports = True
    for instance in (prefill, decode):
        instance.max_model_len = 300_000
    prompt = [100 + i % 40_000 for i in range(200_000)]
    with LiveGateway([prefill, decode]) as gateway:
        response = post(gateway, completion(prompt, stream=stream))
    assert response.status_code == 200, response.text
    if stream:
        assert response.text.rstrip().endswith("data: [DONE]")
        assert "t102" in response.text
    else:
        assert response.json()["usage"]["prompt_tokens"] == 200_000
        assert response.json()["choices"][0]["text"] == "t100t101t102"
    assert len(decode.received) == 1


def test_an_event_over_the_size_limit_is_a_clean_502(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "MAX_EVENT_BYTES", 10_000)
    decode = FakeInstance("decode-0", "decode")
    with LiveGateway([decode]) as gateway:
        response = post(gateway, completion(list(range(1, 3001))))
        assert_openai_error(response, 502)
        assert "limit" in response.json()["error"]["message"]
        assert post(gateway, completion([1, 2, 3])).status_code == 200


def test_split_events_handle_crlf_and_multiline_data() -> None:
    buffer = bytearray(b'data: {"a":\r\ndata: 1}\r\n\r\n: comment\n\ndata: [DO')
    first = upstream._split_event(buffer)
    assert first is not None and upstream._event_data(first) == b'{"a":\n1}'
    second = upstream._split_event(buffer)
    assert second is not None and upstream._event_data(second) is None
    assert upstream._split_event(buffer) is None and bytes(buffer) == b"data: [DO"


# --- fault 6: the decode instance leaves while the prefill runs ---------------------------------


def test_a_decode_instance_leaving_during_the_prefill_is_replaced() -> None:
    prefill = FakeInstance("prefill-0", "prefill")
    prefill.exports = True
    prefill.hold = asyncio.Event()
    first = FakeInstance("decode-0", "decode", free_blocks=1000)
    second = FakeInstance("decode-1", "decode", free_blocks=900)
    with LiveGateway([prefill, first, second]) as gateway, ThreadPoolExecutor(1) as pool:
        released = record_releases(gateway)
        future = pool.submit(post, gateway, completion(LONG_PROMPT))
        wait_until(lambda: len(prefill.received) == 1, what="the prefill leg")
        on_loop(gateway, lambda: gateway.ctx.control.handle(Deregister(instance_id="decode-0")))
        gateway.loop.call_soon_threadsafe(prefill.hold.set)
        response = future.result(timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "t100t101t102"
    assert first.received == []
    transfer_id = prefill.received[0]["kv_transfer_params"]["pdserve"]["export"]["transfer_id"]
    assert leg_sources(second) == [transfer_id]  # the new decode instance pulls the KV
    assert released == []


def test_no_decode_instance_left_after_the_prefill_decodes_on_the_prefill_instance() -> None:
    """Roles are preferences: the prefill instance serves the rest itself (recomputing from
    its prefix cache), and the export nobody will pull is released at once."""
    prefill = FakeInstance("prefill-0", "prefill")
    prefill.exports = True
    prefill.hold = asyncio.Event()
    decode = FakeInstance("decode-0", "decode")
    with LiveGateway([prefill, decode]) as gateway, ThreadPoolExecutor(1) as pool:
        released = record_releases(gateway)
        future = pool.submit(post, gateway, completion(LONG_PROMPT))
        wait_until(lambda: len(prefill.received) == 1, what="the prefill leg")
        on_loop(gateway, lambda: gateway.ctx.control.handle(Deregister(instance_id="decode-0")))
        gateway.loop.call_soon_threadsafe(prefill.hold.set)
        response = future.result(timeout=30)
        assert response.status_code == 200, response.text
        assert [bool(b.get("stream")) for b in prefill.received] == [False, True]
        assert leg_sources(prefill) == [None, None]  # the decode leg pulls nothing
        transfer_id = prefill.received[0]["kv_transfer_params"]["pdserve"]["export"]
        assert released == [transfer_id["transfer_id"]]
        assert not any(r.held for r in gateway.ctx.control.instances.values())


# --- fault 12: releases (and so exporter tombstones) only for exports nobody pulled -------------


def test_a_completed_disaggregated_request_sends_no_release() -> None:
    prefill, decode = FakeInstance("prefill-0", "prefill"), FakeInstance("decode-0", "decode")
    prefill.exports = True
    with LiveGateway([prefill, decode]) as gateway:
        released = record_releases(gateway)
        for stream in (False, True, False):
            assert post(gateway, completion(LONG_PROMPT, stream=stream)).status_code == 200
    assert all(leg_sources(decode))  # every decode leg was told to pull
    assert released == []


def test_a_decode_leg_refused_before_any_output_releases_the_export() -> None:
    prefill, decode = FakeInstance("prefill-0", "prefill"), FakeInstance("decode-0", "decode")
    prefill.exports = True
    decode.refuse_streams = True
    with LiveGateway([prefill, decode]) as gateway:
        released = record_releases(gateway)
        assert_openai_error(post(gateway, completion(LONG_PROMPT)), 503)
    assert released == leg_sources(decode) and len(released) == 1


# --- fault 10: a failover during a migration makes its pin stale --------------------------------


class FakeEngineControl:
    """An engine control port that answers Pin (once ``pin_gate`` is set) and Unpin."""

    def __init__(self) -> None:
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.pins: list[Pin] = []
        self.pin_gate = threading.Event()
        self._stop = threading.Event()
        self._codec: Codec[Any] = Codec(KVMessage, SECRET)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakeEngineControl:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.pin_gate.set()
        self._stop.set()
        self._thread.join(5)

    def _serve(self) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.address)
        try:
            while not self._stop.is_set():
                if not sock.poll(50):
                    continue
                identity, *frames = sock.recv_multipart()
                message = self._codec.decode(frames)
                if isinstance(message, Pin):
                    self.pins.append(message)
                    self.pin_gate.wait()
                    reply: Any = Pinned(
                        rid=message.rid,
                        num_computed_tokens=40,
                        block_size=16,
                        bytes_per_block=1,
                        cache_fingerprint="fake",
                        addresses=["tcp://127.0.0.1:9"],
                        instance_id="decode-0",
                    )
                    sock.send_multipart([identity, *self._codec.encode(reply)])
                elif isinstance(message, Unpin):
                    sock.send_multipart([identity, *self._codec.encode(message)])
        finally:
            sock.close(linger=0)


@pytest.fixture
def engine() -> Iterator[FakeEngineControl]:
    with FakeEngineControl() as control:
        yield control


def test_a_failover_during_a_migration_aborts_it_and_ignores_its_pin(
    engine: FakeEngineControl,
) -> None:
    source = FakeInstance("decode-0", "decode", free_blocks=1000)
    source.control_address = engine.address
    source.pause_after_first = asyncio.Event()
    target = FakeInstance("decode-1", "decode", free_blocks=800)
    survivor = FakeInstance("decode-2", "decode", free_blocks=900)
    survivor.pause_after_first = asyncio.Event()
    with LiveGateway([source, target, survivor]) as gateway, ThreadPoolExecutor(2) as pool:
        sessions = gateway.app.state.sessions
        request = pool.submit(post, gateway, completion(list(range(1, 41)), stream=True))
        wait_until(lambda: any(s.output_ids for s in sessions.where), what="a first token")
        session = next(iter(sessions.where))
        move = {"request_key": session.key, "target": "decode-1"}
        migration = pool.submit(
            lambda: httpx.post(gateway.url + "/admin/migrate", json=move, timeout=30)
        )
        wait_until(lambda: len(engine.pins) == 1, what="the Pin")
        # The source dies while the Pin is in flight: the request fails over to decode-2.
        on_loop(gateway, lambda: gateway.ctx.control.handle(Deregister(instance_id="decode-0")))
        wait_until(
            lambda: session.instance_id == "decode-2" and len(session.output_ids) >= 2,
            what="the failover leg's first token",
        )
        engine.pin_gate.set()  # the stale pin arrives
        result = migration.result(timeout=30)
        gateway.loop.call_soon_threadsafe(survivor.pause_after_first.set)
        response = request.result(timeout=30)
    assert result.status_code == 200, result.text
    assert (result.json()["status"], result.json()["failure"]) == ("aborted", "failed_over")
    assert target.received == []  # no pre-copy and no leg against the stale pin
    assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]")
    assert leg_sources(survivor) == [None]


def test_a_failover_overtakes_a_migration_cut_not_yet_taken() -> None:
    asyncio.run(_failover_overtakes_migration())


async def _failover_overtakes_migration() -> None:
    request = parse_request("completion", {"model": MODEL, "prompt": "hi"})
    session = RequestSession(SimpleNamespace(), SessionRegistry(), "completion", request)  # type: ignore[arg-type]
    aborts: list[bool] = []
    session._stream = SimpleNamespace(abort=lambda: aborts.append(True))  # type: ignore[assignment]
    session.legs = 1
    assert not session.interrupt(Cut("migration", target="decode-1", leg=0))  # planned earlier
    migration = Cut("migration", target="decode-1", leg=1)
    assert session.interrupt(migration)
    assert not aborts, "a migration cut waits for the leg's next token"
    assert session.interrupt(Cut("failover"))
    assert aborts == [True], "a failover cuts at once"
    assert migration.done.is_set() and migration.failed_over and migration.error
    assert session._cut is not None and session._cut.reason == "failover"
    await asyncio.sleep(CUT_FALLBACK_S + 0.1)
    assert aborts == [True], "the migration's fallback cut was cancelled"


def test_a_migration_cut_waits_for_the_next_token_or_cuts_after_the_fallback() -> None:
    asyncio.run(_migration_cut_fallback())


async def _migration_cut_fallback() -> None:
    request = parse_request("completion", {"model": MODEL, "prompt": "hi"})
    session = RequestSession(SimpleNamespace(), SessionRegistry(), "completion", request)  # type: ignore[arg-type]
    aborts: list[bool] = []
    session._stream = SimpleNamespace(abort=lambda: aborts.append(True))  # type: ignore[assignment]
    session.legs = 1
    assert session.interrupt(Cut("migration", target="decode-1", leg=1))
    assert not session._cut_due(0), "no token came yet"
    session.output_ids.append(7)
    assert session._cut_due(0), "the leg is cut right after its next token"
    await asyncio.sleep(CUT_FALLBACK_S + 0.1)
    assert aborts == [True], "no token in time: cut mid-step"


def test_a_held_decode_share_outlives_reports_until_the_leg_starts() -> None:
    plane = ControlPlane(GatewaySettings(), SECRET, PdPolicy(DispatchSettings()))
    instances = [FakeInstance("p", "prefill"), FakeInstance("d", "decode")]
    for instance in instances:
        plane.handle(instance.registration())
        plane.handle(instance.report())
    choice = plane.dispatch(RequestEstimate(prompt_tokens=500, max_tokens=10), key="k")
    assert (choice.prefill, choice.decode) == ("p", "d")
    later = time.monotonic() + 1.0
    for instance in instances:
        plane.handle(instance.report(), now=later)
    assert plane.instances["p"].pending_total(later).requests == 0  # the prefill is reported
    assert plane.instances["d"].pending_total(later).requests == 1  # the decode leg is not yet
    plane.decode_started("k", "d")
    assert not plane.instances["d"].held
    assert plane.instances["d"].pending_total(time.monotonic()).requests == 1
    plane.handle(instances[1].report(), now=time.monotonic() + 1.0)
    assert plane.instances["d"].pending_total(time.monotonic()).requests == 0
    plane.dispatch(RequestEstimate(prompt_tokens=500, max_tokens=10), key="gone")
    plane.forget_held("gone")
    assert not plane.instances["d"].held
