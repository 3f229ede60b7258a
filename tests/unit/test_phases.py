"""The time to first token by phase (``gateway.phases``): the phases of a timeline, and what
the gateway shows of them in ``pdserve_request_phase_seconds`` and ``/admin/requests``, with
the fake instances of the gateway tests."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from pdserve.gateway.phases import Phase, RecentRequests, Timeline
from pdserve.protocol.reports import LoadReport
from tests.unit.gateway_harness import FakeInstance, LiveGateway
from tests.unit.test_gateway_kv_faults import LONG_PROMPT, completion, post, wait_until

pytestmark = pytest.mark.unit

DISAGGREGATED = {Phase.TOKENIZE, Phase.QUEUE, Phase.PREFILL, Phase.KV_TRANSFER, Phase.FIRST_DECODE}
WHOLE = {Phase.TOKENIZE, Phase.QUEUE, Phase.PREFILL}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def at(self, now: float) -> Clock:
        self.now = now
        return self


def _load(step_ms: float) -> LoadReport:
    return LoadReport(
        instance_id="d",
        seq=1,
        num_running=0,
        num_waiting=0,
        num_loading=0,
        free_blocks=10,
        total_blocks=10,
        block_size=16,
        waiting_prompt_tokens=0,
        waiting_blocks=0,
        step_ms=step_ms,
        prefill_tokens_per_s=0.0,
        num_preemptions=0,
    )


def test_a_disaggregated_requests_phases_add_up_to_its_time_to_first_token() -> None:
    clock = Clock()
    timeline = Timeline(0.0, clock=clock)
    clock.at(0.002)
    timeline.mark_tokenized()
    clock.at(0.1)
    timeline.prefill_sent()
    clock.at(0.6)
    timeline.prefill_done()
    clock.at(0.61)
    timeline.leg_sent(_load(step_ms=30), pulled=True)
    clock.at(0.75)
    timeline.first_token()
    phases = timeline.phases()
    assert phases == pytest.approx(
        {
            Phase.TOKENIZE: 0.002,
            Phase.QUEUE: 0.098,
            Phase.PREFILL: 0.5,
            Phase.KV_TRANSFER: 0.12,  # 0.6 to 0.75 less the 30 ms step
            Phase.FIRST_DECODE: 0.03,
        }
    )
    assert sum(phases.values()) == pytest.approx(0.75)
    assert timeline.as_json()["ttft_s"] == pytest.approx(0.75)


def test_a_whole_request_has_only_the_phases_that_exist() -> None:
    clock = Clock()
    timeline = Timeline(0.0, clock=clock)
    timeline.mark_tokenized()
    clock.at(0.01)
    timeline.leg_sent(_load(step_ms=30), pulled=False)
    assert set(timeline.phases()) == {Phase.TOKENIZE, Phase.QUEUE}  # in flight
    clock.at(0.2)
    timeline.first_token()
    assert timeline.phases() == pytest.approx(
        {Phase.TOKENIZE: 0.0, Phase.QUEUE: 0.01, Phase.PREFILL: 0.19}
    )


def test_a_prefill_that_failed_over_to_a_whole_leg_counts_as_whole() -> None:
    clock = Clock()
    timeline = Timeline(0.0, clock=clock)
    timeline.prefill_sent()
    clock.at(0.5)  # the prefill instance broke: no KV, the decode instance prefills
    timeline.leg_sent(None, pulled=False)
    clock.at(0.9)
    timeline.first_token()
    assert timeline.phases() == pytest.approx({Phase.QUEUE: 0.0, Phase.PREFILL: 0.9})


def test_a_step_longer_than_the_wait_is_clamped() -> None:
    clock = Clock()
    timeline = Timeline(0.0, clock=clock)
    timeline.prefill_sent()
    clock.at(0.1)
    timeline.prefill_done()
    timeline.leg_sent(_load(step_ms=500), pulled=True)
    clock.at(0.15)
    timeline.first_token()
    phases = timeline.phases()
    assert phases[Phase.KV_TRANSFER] == pytest.approx(0.0)
    assert phases[Phase.FIRST_DECODE] == pytest.approx(0.05)


def test_recent_requests_keep_the_newest() -> None:
    recent = RecentRequests(2)

    class Row:
        instance_id = "i"
        prompt_ids = [1]
        output_ids: list[int] = []
        finish_reason = "length"
        timeline = Timeline(0.0)

        def __init__(self, key: str) -> None:
            self.key = key

    for key in "abc":
        recent.add(Row(key))
    assert [r["request_key"] for r in recent.latest(5)] == ["c", "b"]
    assert recent.latest(0) == []


def _phase_counts(gateway: LiveGateway) -> dict[str, float]:
    text = httpx.get(gateway.url + "/metrics").text
    counts = {}
    for line in text.splitlines():
        if line.startswith("pdserve_request_phase_seconds_count"):
            phase = line.split('phase="')[1].split('"')[0]
            counts[phase] = float(line.rsplit(" ", 1)[1])
    return counts


def _recent(gateway: LiveGateway, n: int = 10) -> list[dict[str, object]]:
    return list(httpx.get(gateway.url + f"/admin/requests?recent={n}").json())


def test_the_gateway_shows_each_requests_phases() -> None:
    prefill, decode = FakeInstance("prefill-0", "prefill"), FakeInstance("decode-0", "decode")
    prefill.exports = True
    with LiveGateway([prefill, decode]) as gateway:
        assert post(gateway, completion(LONG_PROMPT)).status_code == 200
        assert post(gateway, completion([1, 2, 3])).status_code == 200  # short: whole
        rows = _recent(gateway)
        counts = _phase_counts(gateway)
        assert httpx.get(gateway.url + "/admin/requests").json() == []  # none in flight
    short, long = rows  # newest first
    assert set(long["phases_s"]) == set(DISAGGREGATED)  # type: ignore[arg-type]
    assert set(short["phases_s"]) == set(WHOLE)  # type: ignore[arg-type]
    for row in rows:
        assert row["finish_reason"] == "length" and row["output_tokens"] == 3
        total = sum(row["phases_s"].values())  # type: ignore[attr-defined]
        assert total == pytest.approx(row["ttft_s"], abs=1e-5)
    assert long["prompt_tokens"] == len(LONG_PROMPT)
    assert counts == {"tokenize": 2, "queue": 2, "prefill": 2, "kv_transfer": 1, "first_decode": 1}


def test_a_request_in_flight_shows_its_phases_so_far() -> None:
    decode = FakeInstance("decode-0", "decode")
    decode.pause_after_first = asyncio.Event()
    with LiveGateway([decode]) as gateway, ThreadPoolExecutor(1) as pool:
        future = pool.submit(post, gateway, completion([1, 2, 3]))
        wait_until(
            lambda: any(r["ttft_s"] for r in httpx.get(gateway.url + "/admin/requests").json()),
            what="the first token",
        )
        (row,) = httpx.get(gateway.url + "/admin/requests").json()
        assert row["instance"] == "decode-0" and row["finish_reason"] is None
        assert set(row["phases_s"]) == set(WHOLE)
        gateway.loop.call_soon_threadsafe(decode.pause_after_first.set)
        assert future.result(timeout=30).status_code == 200


def test_samples_that_follow_a_leader_are_not_observed_again() -> None:
    with LiveGateway() as gateway:
        body = completion([1, 2, 3], n=3, seed=1)
        assert post(gateway, body).status_code == 200
        assert _phase_counts(gateway)["queue"] == 1  # one prompt: one observation
        assert len(_recent(gateway)) == 3  # but every sample is a row
