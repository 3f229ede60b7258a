"""Hostile input and access control at the gateway's doors (no vLLM: fake instances).

- HTTP: body size limit (413), admission bound (429 with Retry-After), ``--api-key`` (401),
  no instance (503), every error in OpenAI's format;
- ZeroMQ: control-plane and KV-control messages signed with another secret, or not signed
  at all, are refused, logged, and change nothing.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import zmq
import zmq.asyncio

from pdserve.cluster.processes import free_port
from pdserve.gateway.control_plane import ControlPlane
from pdserve.gateway.kv_client import KVControlClient
from pdserve.gateway.settings import GatewaySettings
from pdserve.kv.messages import KVMessage, Pin, Pinned, Release, StoreSet
from pdserve.kv.transport import Messenger, kv_codec
from pdserve.protocol.reports import ControlMessage, Deregister, LoadReport, Register
from pdserve.protocol.wire import Codec
from pdserve.scheduler.dispatch import DispatchSettings, PdPolicy
from tests.unit.gateway_harness import SECRET, FakeInstance, LiveGateway

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
WRONG_SECRET = b"not-the-cluster-secret"


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert "param" in error
    return error


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.01)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def warnings(self, text: str) -> list[str]:
        return [
            r.getMessage()
            for r in self.records
            if r.levelno >= logging.WARNING and text in r.getMessage()
        ]


@pytest.fixture
def pdserve_log() -> Iterator[_Records]:
    """What pdserve logs (its logger does not propagate to pytest's caplog)."""
    handler = _Records()
    logger = logging.getLogger("pdserve")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# --- body size ---------------------------------------------------------------------------------

LIMIT = 2048


def test_oversized_bodies_are_413_declared_or_streamed() -> None:
    with LiveGateway(max_body_bytes=LIMIT) as gw, httpx.Client(base_url=gw.url, timeout=10) as c:
        padded = {**CHAT, "user": "x" * (LIMIT - 200)}
        assert c.post("/v1/chat/completions", json=padded).status_code == 200

        declared = c.post(
            "/v1/chat/completions", json={**CHAT, "user": "x" * (LIMIT + 1)}
        )  # Content-Length over the limit: refused before the body is read
        assert "larger than" in assert_openai_error(declared, 413)["message"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(LIMIT // 256 + 2):
                yield b"y" * 256
            yield b'"}'

        streamed = c.post(
            "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert_openai_error(streamed, 413)
        assert sum(len(i.received) for i in gw.instances) == 1, "only the small one went on"
        assert c.get("/health").status_code == 200


# --- admission -----------------------------------------------------------------------------------


def test_requests_beyond_the_admission_bound_are_429_with_retry_after() -> None:
    decode = FakeInstance("decode-0", "decode")
    decode.hold = asyncio.Event()
    with (
        LiveGateway([decode], max_inflight=1, max_queued=1) as gw,
        httpx.Client(base_url=gw.url, timeout=10) as c,
    ):
        answers: dict[str, httpx.Response] = {}

        def send(name: str) -> threading.Thread:
            thread = threading.Thread(
                target=lambda: answers.__setitem__(name, c.post("/v1/chat/completions", json=CHAT))
            )
            thread.start()
            return thread

        first = send("first")
        wait_until(lambda: gw.ctx.admission.inflight == 1, what="the first request to be served")
        second = send("second")
        wait_until(lambda: gw.ctx.admission.queued == 1, what="the second request to queue")

        third = c.post("/v1/chat/completions", json=CHAT)
        assert "capacity" in assert_openai_error(third, 429)["message"]
        assert int(third.headers["Retry-After"]) >= 1

        gw.loop.call_soon_threadsafe(decode.hold.set)
        first.join(10)
        second.join(10)
        assert answers["first"].status_code == 200 and answers["second"].status_code == 200
        assert gw.ctx.admission.inflight == 0 and gw.ctx.admission.queued == 0
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_without_instances_requests_are_503_with_retry_after() -> None:
    with LiveGateway([]) as gw, httpx.Client(base_url=gw.url, timeout=10) as c:
        for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", {"prompt": "x"})):
            response = c.post(path, json=body)
            assert_openai_error(response, 503)
            assert int(response.headers["Retry-After"]) >= 1
        assert c.get("/health").status_code == 503
        assert c.get("/v1/models").json()["data"] == []


# --- API key -----------------------------------------------------------------------------------


def test_api_key_guards_everything_but_health() -> None:
    key = "client-key-123"
    with LiveGateway(api_key=key) as gw, httpx.Client(base_url=gw.url, timeout=10) as c:
        wrong = [
            {},
            {"Authorization": "Bearer"},
            {"Authorization": "Bearer client-key-12"},
            {"Authorization": "Bearer client-key-1234"},
            {"Authorization": f"Basic {key}"},
            {"Authorization": key},
            {"Authorization": f"Bearer {gw.instances[0].api_key}"},  # the instances' key
        ]
        for headers in wrong:
            for method, path in (
                ("POST", "/v1/chat/completions"),
                ("POST", "/v1/completions"),
                ("GET", "/v1/models"),
                ("GET", "/metrics"),
                ("GET", "/admin/instances"),
                ("POST", "/admin/instances/decode-0/drain"),
                ("POST", "/admin/migrate"),
                ("GET", "/openapi.json"),
            ):
                response = c.request(method, path, json=CHAT, headers=headers)
                assert_openai_error(response, 401)
                assert response.headers["WWW-Authenticate"] == "Bearer"
        assert not any(i.received for i in gw.instances), "nothing reached an instance"
        assert gw.ctx.control.instances["decode-0"].draining is False

        assert c.get("/health").status_code == 200
        good = {"Authorization": f"Bearer {key}"}
        assert c.post("/v1/chat/completions", json=CHAT, headers=good).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "x"}, headers=good).status_code == 200
        assert c.get("/v1/models", headers=good).json()["data"][0]["id"] == "fake-model"
        assert c.get("/admin/instances", headers=good).status_code == 200


# --- cluster secret: control plane ------------------------------------------------------------


def _register(name: str, url: str = "http://127.0.0.1:1") -> Register:
    return Register(
        instance_id=name,
        role="decode",
        url=url,
        host="h",
        pid=1,
        model="m",
        kv_addresses=["tcp://127.0.0.1:2"],
        control_address=None,
        max_model_len=1024,
        started_at=0.0,
    )


def _report(name: str, seq: int) -> LoadReport:
    return LoadReport(
        instance_id=name,
        seq=seq,
        num_running=0,
        num_waiting=0,
        num_loading=0,
        free_blocks=10,
        total_blocks=10,
        block_size=16,
        waiting_prompt_tokens=0,
        waiting_blocks=0,
        step_ms=0.0,
        prefill_tokens_per_s=0.0,
        num_preemptions=0,
    )


def test_control_plane_refuses_and_logs_messages_without_the_secret(
    pdserve_log: _Records,
) -> None:
    settings = GatewaySettings(control_port=free_port(), heartbeat_timeout_s=3600)
    honest: Codec[Any] = Codec(ControlMessage, SECRET)
    forged: Codec[Any] = Codec(ControlMessage, WRONG_SECRET)

    async def scenario() -> ControlPlane:
        plane = ControlPlane(settings, SECRET, PdPolicy(DispatchSettings()))
        await plane.start()
        sock = zmq.asyncio.Context.instance().socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(plane.address)

        async def until(condition: Callable[[], bool]) -> None:
            for _ in range(500):
                if condition():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("the control plane never handled the honest message")

        try:
            # An intruder tries to join; junk frames; then an honest instance. One PUSH
            # socket keeps the order: once the honest one is in, the others were handled.
            await sock.send_multipart(forged.encode(_register("intruder")))
            await sock.send_multipart(forged.encode(_report("intruder", 1)))
            await sock.send_multipart([b"not a message"])
            await sock.send_multipart([b"\x00" * 32, b"\x93\x01\x02\x03"])
            await sock.send_multipart(honest.encode(_register("honest", "http://honest")))
            await sock.send_multipart(honest.encode(_report("honest", 1)))
            await until(lambda: "honest" in plane.instances and plane.instances["honest"].healthy)
            assert "intruder" not in plane.instances
            assert plane.refused_messages == 4

            # Hijacking the honest instance (point it elsewhere, report it idle or gone).
            await sock.send_multipart(forged.encode(_register("honest", "http://evil")))
            await sock.send_multipart(forged.encode(Deregister(instance_id="honest")))
            await sock.send_multipart(forged.encode(_report("honest", 99)))
            await sock.send_multipart(honest.encode(_report("honest", 2)))
            await until(lambda: plane.instances["honest"].load.seq == 2)  # type: ignore[union-attr]
            assert plane.instances["honest"].info.url == "http://honest"
            assert plane.refused_messages == 7
            return plane
        finally:
            sock.close(linger=0)
            await plane.stop()

    asyncio.run(scenario())
    refusals = pdserve_log.warnings("refused a control message")
    assert len(refusals) == 7
    assert sum("bad MAC" in r for r in refusals) == 6
    assert not [r for r in pdserve_log.records if "intruder" in r.getMessage()]


# --- cluster secret: KV control ----------------------------------------------------------------


def test_kv_server_refuses_and_logs_messages_without_the_secret(pdserve_log: _Records) -> None:
    """Releases, rendezvous keys and engine commands from a stranger never reach a handler."""
    address = f"tcp://127.0.0.1:{free_port()}"
    requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
    store: queue.SimpleQueue[Any] = queue.SimpleQueue()
    server = Messenger(
        kv_codec(SECRET), address, lambda _, m: requests.put(m), store.put, name="server"
    )
    stranger = Messenger(kv_codec(WRONG_SECRET), None, lambda *_: None, lambda _: None)
    peer = Messenger(kv_codec(SECRET), None, lambda *_: None, lambda _: None)
    try:
        stranger.send(address, Release(transfer_id="someone-elses"))
        stranger.send(address, StoreSet(pair_id="pair", key="rank0", value=b"evil"))
        stranger.send(address, Pin(rid=1, request_key="k", transfer_id="t"))
        wait_until(lambda: len(pdserve_log.warnings("refused a message")) == 3, what="refusals")
        peer.send(address, Release(transfer_id="mine"))
        peer.send(address, StoreSet(pair_id="pair", key="rank1", value=b"ok"))
        assert requests.get(timeout=5) == Release(transfer_id="mine")
        assert store.get(timeout=5) == StoreSet(pair_id="pair", key="rank1", value=b"ok")
        time.sleep(0.1)
        assert requests.empty() and store.empty(), "only the peer's messages were handled"
        assert all("bad MAC" in r for r in pdserve_log.warnings("refused a message"))
    finally:
        for messenger in (stranger, peer, server):
            messenger.stop()


def test_gateway_refuses_and_logs_engine_replies_without_the_secret(
    pdserve_log: _Records,
) -> None:
    """A forged ``Pinned`` would send a migration's pull to addresses of the forger's choice."""
    address = f"tcp://127.0.0.1:{free_port()}"
    engine: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    engine.setsockopt(zmq.LINGER, 0)
    engine.bind(address)
    codec: Codec[Any] = Codec(KVMessage, SECRET)

    def pinned(rid: int) -> Pinned:
        return Pinned(
            rid=rid,
            num_computed_tokens=1,
            block_size=16,
            bytes_per_block=1,
            cache_fingerprint="l",
            addresses=["tcp://evil:1"],
            instance_id="d",
        )

    def answer(reply_secret: bytes) -> None:
        identity, *frames = engine.recv_multipart()
        pin = codec.decode(frames)
        signer: Codec[Any] = Codec(KVMessage, reply_secret)
        engine.send_multipart([identity, *signer.encode(pinned(pin.rid))])

    async def scenario() -> tuple[str, Any]:
        client = KVControlClient(SECRET)
        make = lambda rid: Pin(rid=rid, request_key="k", transfer_id="t")  # noqa: E731
        try:
            responder = asyncio.get_running_loop().run_in_executor(None, answer, WRONG_SECRET)
            try:
                await client.call(address, make, timeout_s=1.0)
                forged = "accepted"
            except TimeoutError:
                forged = "refused"
            await responder
            responder = asyncio.get_running_loop().run_in_executor(None, answer, SECRET)
            genuine = await client.call(address, make, timeout_s=5.0)
            await responder
            return forged, genuine
        finally:
            client.close()

    try:
        forged, genuine = asyncio.run(scenario())
    finally:
        engine.close(linger=0)
    assert forged == "refused"
    assert isinstance(genuine, Pinned)
    refusals = pdserve_log.warnings("refused a reply")
    assert len(refusals) == 1 and "bad MAC" in refusals[0]
