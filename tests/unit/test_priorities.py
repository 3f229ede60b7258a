"""Priorities and SLO overrides at the gateway, and admission control by predicted TTFT
(pure parts on their own, the rest through the real gateway in front of fake instances)."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import pytest

from pdserve.gateway.context import SloShedding
from pdserve.gateway.control_plane import ControlPlane
from pdserve.gateway.errors import APIError
from pdserve.gateway.openai_api import Service, estimate_of, parse_request, parse_service
from pdserve.gateway.settings import GatewaySettings
from pdserve.instance.launch import kv_settings_for, vllm_argv
from pdserve.instance.settings import InstanceSettings
from pdserve.protocol.reports import LoadReport
from pdserve.scheduler.admission import (
    MAX_RETRY_AFTER_S,
    TtftPredictor,
    Verdict,
    predicted_ttft_s,
)
from pdserve.scheduler.dispatch import DispatchSettings, PdPolicy
from pdserve.scheduler.slo import SloSettings
from pdserve.scheduler.snapshot import ClusterSnapshot, RequestEstimate
from tests.unit.gateway_harness import MODEL, FakeInstance, LiveGateway
from tests.unit.test_control_plane import register, report
from tests.unit.test_dispatch import view

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
LONG_PROMPT = list(range(1, 201))  # past short_prompt_tokens: prefilled on a prefill instance


def service_of(headers: dict[str, str], **body: Any) -> Service:
    return parse_service(headers, parse_request("chat", {**CHAT, **body}))


def refusal(headers: dict[str, str], **body: Any) -> APIError:
    with pytest.raises(APIError) as info:
        service_of(headers, **body)
    return info.value


# --- the request's service class ----------------------------------------------------------------


def test_priority_keeps_vllms_convention_and_the_policies_get_it_turned_around() -> None:
    assert service_of({}) == Service(0)
    urgent = service_of({}, priority=-5)
    assert urgent.vllm_priority == -5 and urgent.priority == 5  # more important
    estimate = estimate_of(
        parse_request("chat", {**CHAT, "priority": 3}), service_of({}, priority=3)
    )
    assert estimate.priority == -3 and estimate.slo_ttft_ms is None


def test_a_priority_header_wins_over_the_body() -> None:
    assert service_of({"x-priority": "-2"}, priority=7).vllm_priority == -2
    assert service_of({"x-vllm-priority": " 4 "}).vllm_priority == 4  # vLLM's own header
    assert service_of({"x-priority": "1", "x-vllm-priority": "9"}).vllm_priority == 1


def test_slo_headers_are_the_requests_own_objectives() -> None:
    got = service_of({"x-slo-ttft-ms": "250", "x-slo-tpot-ms": "12.5"})
    assert (got.slo_ttft_ms, got.slo_tpot_ms) == (250.0, 12.5)
    request = parse_request("chat", CHAT)
    estimate = estimate_of(request, got)
    assert (estimate.slo_ttft_ms, estimate.slo_tpot_ms) == (250.0, 12.5)
    assert SloSettings(ttft_ms=5000).ttft_s(estimate) == 0.25  # the request's wins


@pytest.mark.parametrize(
    ("headers", "param"),
    [
        ({"x-priority": "high"}, "x-priority"),
        ({"x-priority": "1.5"}, "x-priority"),
        ({"x-priority": str(2**63)}, "x-priority"),
        ({"x-vllm-priority": ""}, "x-vllm-priority"),
        ({"x-slo-ttft-ms": "0"}, "x-slo-ttft-ms"),
        ({"x-slo-ttft-ms": "-5"}, "x-slo-ttft-ms"),
        ({"x-slo-ttft-ms": "nan"}, "x-slo-ttft-ms"),
        ({"x-slo-tpot-ms": "inf"}, "x-slo-tpot-ms"),
        ({"x-slo-tpot-ms": "fast"}, "x-slo-tpot-ms"),
    ],
)
def test_invalid_headers_are_400_naming_the_header(headers: dict[str, str], param: str) -> None:
    error = refusal(headers)
    assert error.status == 400 and error.param == param and param in error.message


@pytest.mark.parametrize("value", [True, "1", 1.0, 2**63, None])
def test_the_priority_field_is_a_strict_integer(value: object) -> None:
    error = refusal({}, priority=value)
    assert error.status == 400 and error.param == "priority"


def test_priority_scheduling_is_an_instance_option() -> None:
    def argv(extra: list[str], **settings: Any) -> list[str]:
        instance = InstanceSettings(**settings)
        return vllm_argv(instance, kv_settings_for(instance), "m", None, extra, False)

    assert "--scheduling-policy" not in argv([])
    on = argv([], priority_scheduling=True)
    assert on[on.index("--scheduling-policy") + 1] == "priority"
    mine = argv(["--scheduling-policy", "fcfs"], priority_scheduling=True)
    assert mine.count("--scheduling-policy") == 1  # the user's own flag is kept


# --- the TTFT prediction and admission ------------------------------------------------------------


def queued(name: str, tokens: int, rate: float = 1000.0, role: str = "prefill") -> Any:
    return view(name, role, queued_tokens=tokens, rate=rate)


def test_predicted_ttft_is_the_queue_then_the_prompt_over_the_measured_rate() -> None:
    assert predicted_ttft_s(queued("p", 3000), 1000, 2000.0) == 4.0
    assert predicted_ttft_s(queued("p", 3000, rate=0.0), 1000, 2000.0) == 2.0  # the default


def test_admission_refuses_only_when_no_instance_meets_the_slo() -> None:
    predictor = TtftPredictor(2000.0)
    request = RequestEstimate(prompt_tokens=1000, max_tokens=16)
    cluster = ClusterSnapshot((queued("p", 9000), queued("d", 4000, role="decode")))
    assert predictor.admit(cluster, request, None).verdict is Verdict.ADMIT  # no SLO
    met = predictor.admit(cluster, request, 6.0)
    assert met.verdict is Verdict.ADMIT and met.predicted_ttft_s == 5.0  # on the decode one
    late = predictor.admit(cluster, request, 2.5)
    assert late.verdict is Verdict.REFUSE and late.retry_after_s == 3  # 2.5 s late, rounded up
    assert predictor.admit(cluster, request, 0.001).retry_after_s <= MAX_RETRY_AFTER_S
    nobody = ClusterSnapshot((view("p", "prefill", healthy=False),))
    assert predictor.admit(nobody, request, 0.001).verdict is Verdict.ADMIT  # the 503 says it


def test_admission_finds_the_best_instance_on_the_gateways_index() -> None:
    cp = ControlPlane(GatewaySettings(), b"k", PdPolicy(DispatchSettings()))
    predictor = TtftPredictor(2000.0)
    for n, tokens in enumerate((5000, 200, 9000)):
        cp.handle(register(f"p{n}", "prefill"))
        loaded = msgspec.structs.replace(report(f"p{n}", 1), waiting_prompt_tokens=tokens)
        cp.handle(msgspec.structs.replace(loaded, prefill_tokens_per_s=1000.0))
    snapshot = cp.snapshot()
    assert predictor.best_ttft_s(snapshot, 100) == 0.3
    assert predictor.best_ttft_s(ClusterSnapshot(snapshot.instances), 100) == 0.3  # as a scan


def test_shedding_is_off_by_default_and_spares_the_higher_classes() -> None:
    cp = ControlPlane(GatewaySettings(), b"k", PdPolicy(DispatchSettings()))
    cp.handle(register("p", "prefill"))
    loaded = msgspec.structs.replace(report("p", 1), waiting_prompt_tokens=50_000)
    cp.handle(msgspec.structs.replace(loaded, prefill_tokens_per_s=1000.0))
    slo = SloSettings(ttft_ms=1000)
    low = RequestEstimate(100, 16, priority=-1)  # vLLM priority 1
    off = SloShedding(GatewaySettings(), TtftPredictor(2000.0), slo)
    off.check(cp, low)
    on = SloShedding(GatewaySettings(shed_over_slo=True), TtftPredictor(2000.0), slo)
    on.check(cp, RequestEstimate(100, 16))  # normal priority: not the lowest class
    with pytest.raises(APIError) as info:
        on.check(cp, low)  # the cluster's SLO: 50 s of queue is far past 1 s
    assert info.value.status == 429 and int(info.value.headers["Retry-After"]) >= 1
    everyone = SloShedding(
        GatewaySettings(shed_over_slo=True, shed_priority=0), TtftPredictor(2000.0), slo
    )
    with pytest.raises(APIError):
        everyone.check(cp, RequestEstimate(100, 16))
    on.check(cp, RequestEstimate(100, 16, priority=-1, slo_ttft_ms=60_000))  # its own SLO


# --- through the gateway ------------------------------------------------------------------------


def loaded_report(instance: FakeInstance, tokens: int) -> LoadReport:
    return msgspec.structs.replace(
        instance.report(), seq=2, waiting_prompt_tokens=tokens, prefill_tokens_per_s=1000.0
    )


def handle(gateway: LiveGateway, message: Any) -> None:
    async def call() -> None:
        gateway.ctx.control.handle(message)

    gateway.run(call())


def test_the_priority_reaches_every_leg_as_vllms_value() -> None:
    prefill, decode = FakeInstance("prefill-0", "prefill"), FakeInstance("decode-0", "decode")
    prefill.exports = True
    with LiveGateway([prefill, decode]) as gw, httpx.Client(base_url=gw.url, timeout=30) as c:
        body = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 3, "priority": 5}
        assert c.post("/v1/completions", json=body, headers={"x-priority": "-1"}).is_success
        assert [b["priority"] for b in prefill.received + decode.received] == [-1, -1]
        assert c.post("/v1/chat/completions", json=CHAT).is_success
        assert "priority" not in decode.received[-1]  # nothing set: vLLM's default


def test_invalid_headers_are_openai_400s_that_reach_no_instance() -> None:
    with LiveGateway() as gw, httpx.Client(base_url=gw.url, timeout=30) as c:
        for headers in ({"x-priority": "urgent"}, {"x-slo-ttft-ms": "-1"}):
            answer = c.post("/v1/chat/completions", json=CHAT, headers=headers)
            assert answer.status_code == 400
            error = answer.json()["error"]
            assert error["param"] == next(iter(headers)) and error["code"] == 400
        assert not any(i.received for i in gw.instances)


def test_shedding_refuses_the_lowest_class_with_429_and_counts_it() -> None:
    prefill = FakeInstance("prefill-0", "prefill")
    with (
        LiveGateway([prefill], shed_over_slo=True) as gw,
        httpx.Client(base_url=gw.url, timeout=30) as c,
    ):
        handle(gw, loaded_report(prefill, 30_000))  # 30 s of queued prefill
        late = {"x-priority": "1", "x-slo-ttft-ms": "2000"}
        refused = c.post("/v1/chat/completions", json=CHAT, headers=late)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "RateLimitError"
        assert 1 <= int(refused.headers["Retry-After"]) <= MAX_RETRY_AFTER_S
        assert not prefill.received
        normal = {"x-slo-ttft-ms": "2000"}
        assert c.post("/v1/chat/completions", json=CHAT, headers=normal).is_success
        assert c.post("/v1/chat/completions", json=CHAT, headers={"x-priority": "1"}).is_success
        metrics = c.get("/metrics").text
        assert 'pdserve_refused_requests_total{reason="over_slo"} 1.0' in metrics
        assert 'pdserve_dispatches_total{mode="fallback"} 2.0' in metrics
        assert "pdserve_held_requests 0.0" in metrics


def test_a_prefill_only_cluster_answers_and_says_so() -> None:
    """``--prefill 1 --decode 0``: served whole on the prefill instance, /health 200."""
    only = [FakeInstance("prefill-0", "prefill")]
    with LiveGateway(only) as gw, httpx.Client(base_url=gw.url, timeout=30) as c:
        health = c.get("/health")
        assert health.status_code == 200
        assert health.json()["serving"] == "colocated-only"
        assert health.json()["roles"] == {"prefill": 1, "decode": 0, "both": 0}
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [MODEL]
        body = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 3}
        assert c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert c.post("/v1/chat/completions", json=CHAT).is_success
        assert len(only[0].received) == 2


def test_health_and_models_agree_with_what_can_be_served() -> None:
    prefill, decode = FakeInstance("prefill-0", "prefill"), FakeInstance("decode-0", "decode")
    with LiveGateway([prefill, decode]) as gw, httpx.Client(base_url=gw.url, timeout=30) as c:
        assert c.get("/health").json()["serving"] == "disaggregated"

        async def drain_all() -> None:
            for record in gw.ctx.control.instances.values():
                record.draining = True

        gw.run(drain_all())
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["serving"] == "none"
        assert c.get("/v1/models").json()["data"] == []
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 503
        assert 'pdserve_refused_requests_total{reason="no_instance"} 1.0' in c.get("/metrics").text


def test_the_gateway_sheds_by_the_clusters_slo_setting() -> None:
    from pdserve.gateway.app import create_app

    dispatch = DispatchSettings(slo=SloSettings(ttft_ms=1500))
    app = create_app(GatewaySettings(shed_over_slo=True), dispatch, b"k")
    shedding = app.state.ctx.shedding
    assert shedding.enabled and shedding.slo.ttft_s(RequestEstimate(1, 1)) == 1.5
