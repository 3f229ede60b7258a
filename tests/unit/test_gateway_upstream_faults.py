"""Issue 11, faults 5 and 9 at the gateway (fake instances, no vLLM): an instance whose stream
breaks in any way (an undecodable event, a body cut short, a reset connection) or that answers
a 200 that is no answer makes the request fail over or end in a clean OpenAI error, never a
500; and a migration whose pre-copy hangs is abandoned at its one deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from aiohttp import web

from pdserve.gateway import app as gateway_app
from pdserve.scheduler.rescheduling import ReschedulingSettings
from tests.unit.gateway_harness import FakeInstance, LiveGateway
from tests.unit.test_gateway_kv_faults import (
    FakeEngineControl,
    completion,
    engine,  # noqa: F401  (the fixture)
    post,
    wait_until,
)

PROMPT = list(range(1, 41))


class BreakingInstance(FakeInstance):
    """Breaks its first streamed answer after the first token, in the way ``how`` says;
    answers like any fake instance afterwards."""

    def __init__(self, name: str, role: str, how: str, **kwargs: Any) -> None:
        super().__init__(name, role, **kwargs)
        self.how = how
        self.broke = 0

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if self.broke or not body.get("stream"):
            return await super()._generate(request)
        self.broke += 1
        self.received.append(body)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        first = self._events(False, list(body["prompt"]), [100, 101, 102])[0]
        await response.write(b"data: " + json.dumps(first).encode() + b"\n\n")
        if self.how == "garbage":
            await response.write(b"data: {not json\n\n")
        elif self.how == "reset":
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write_eof()  # "cut": the body ends without [DONE]
        return response


def stream_legs(instance: FakeInstance) -> int:
    return sum(1 for body in instance.received if body.get("stream"))


@pytest.mark.parametrize("how", ["garbage", "cut", "reset"])
@pytest.mark.parametrize("stream", [True, False])
def test_a_stream_that_breaks_fails_over_to_another_instance(how: str, stream: bool) -> None:
    dying = BreakingInstance("decode-0", "decode", how, free_blocks=1000)
    survivor = FakeInstance("decode-1", "decode", free_blocks=900)
    with LiveGateway([dying, survivor]) as gateway:
        response = post(gateway, completion(PROMPT, stream=stream))
        assert response.status_code == 200, response.text
        if stream:
            assert response.text.rstrip().endswith("data: [DONE]")
            assert '"error"' not in response.text
        else:
            assert response.json()["choices"][0]["text"].startswith("t")
        assert dying.broke == 1 and stream_legs(survivor) == 1, "continued on the survivor"
        assert not gateway.ctx.control.snapshot().get("decode-0").usable  # type: ignore[union-attr]


class NotAnAnswer(FakeInstance):
    """Answers a prefill leg 200 with JSON that is not an object."""

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("stream"):
            return await super()._generate(request)
        self.received.append(body)
        return web.json_response([1, 2, 3])


def test_a_prefill_answer_that_is_no_answer_is_never_a_500() -> None:
    prefill = NotAnAnswer("prefill-0", "prefill")
    decode = FakeInstance("decode-0", "decode")
    with LiveGateway([prefill, decode]) as gateway:
        response = post(gateway, completion(list(range(1, 201))))
    assert response.status_code != 500, response.text
    if response.status_code != 200:
        assert response.json()["error"]["message"]


def test_a_migration_whose_precopy_hangs_ends_at_its_one_deadline(
    engine: FakeEngineControl,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pin, every pre-copy stage and the cut share one deadline (--migration-timeout-s):
    a target that never answers the pre-copy cannot hold the migration slot any longer."""
    monkeypatch.setattr(
        gateway_app, "ReschedulingSettings", lambda: ReschedulingSettings(migration_timeout_s=1.0)
    )
    engine.pin_gate.set()
    source = FakeInstance("decode-0", "decode", free_blocks=1000)
    source.control_address = engine.address
    source.pause_after_first = asyncio.Event()
    target = FakeInstance("decode-1", "decode", free_blocks=800)
    target.hold = asyncio.Event()  # the pre-copy request is never answered
    with LiveGateway([source, target]) as gateway, ThreadPoolExecutor(2) as pool:
        sessions = gateway.app.state.sessions
        request = pool.submit(post, gateway, completion(PROMPT, stream=True))
        wait_until(lambda: any(s.output_ids for s in sessions.where), what="a first token")
        session = next(iter(sessions.where))
        move = {"request_key": session.key, "target": "decode-1"}
        started = time.monotonic()
        result = httpx.post(gateway.url + "/admin/migrate", json=move, timeout=30)
        elapsed = time.monotonic() - started
        gateway.loop.call_soon_threadsafe(source.pause_after_first.set)
        response = request.result(timeout=30)
    assert result.status_code == 200, result.text
    assert (result.json()["status"], result.json()["failure"]) == ("aborted", "timed_out")
    assert elapsed < 3.0, "one deadline, not stages x the HTTP timeout"
    assert len(target.received) == 1, "the one pre-copy stage that hung, and no leg"
    assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]")
    assert session.instance_id == "decode-0", "the request stayed where it was"
