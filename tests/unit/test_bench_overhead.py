"""The gateway overhead benchmark: its pure parts, and a run against fake endpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil
import pytest

from benchmark.gateway_overhead import (
    OverheadSettings,
    PassResult,
    compare,
    format_report,
    pass_order,
    pass_requests,
    pick_instance,
    run,
    serve_args,
)
from pdserve.cli import main as pdserve_main
from pdserve.protocol.wire import SECRET_ENV, instance_api_key
from pdserve.workload.metrics import RequestRecord, summarize
from tests.unit.fake_endpoints import FakeEndpoint, serving, use_fake_serve

SECRET = "test-cluster-secret"
GATEWAY_DELAY_S = 0.05


def test_passes_alternate_which_side_goes_first() -> None:
    order = pass_order(4)
    assert order == [
        (0, "direct"),
        (0, "gateway"),
        (1, "gateway"),
        (1, "direct"),
        (2, "direct"),
        (2, "gateway"),
        (3, "gateway"),
        (3, "direct"),
    ]
    # A linear drift over the run weighs the same on both sides: equal mean positions.
    positions = {
        side: [i for i, (_, s) in enumerate(order) if s == side] for side in ("direct", "gateway")
    }
    assert sum(positions["direct"]) == sum(positions["gateway"])
    assert [k for k, _ in pass_order(3)] == [0, 0, 1, 1, 2, 2]


def test_every_pass_gets_fresh_prompts_of_the_set_lengths() -> None:
    settings = OverheadSettings(prompt_tokens=20, output_tokens=7)
    a, b = pass_requests(settings, 1, 5), pass_requests(settings, 2, 5)
    assert [len(r.prompt) for r in a] == [20] * 5 and {r.output_len for r in a} == {7}
    assert all(x.prompt != y.prompt for x, y in zip(a, b, strict=True))
    assert pass_requests(settings, 1, 5) == a  # seeded


def _pass(side: str, k: int, ttfts: list[float], tokens: int, duration: float) -> PassResult:
    records = [
        RequestRecord(
            index=i,
            input_len=8,
            output_len=tokens,
            ttft_s=t,
            e2e_s=t + 0.5,
            output_tokens=tokens,
            success=True,
        )
        for i, t in enumerate(ttfts)
    ]
    return PassResult(
        side=side,  # type: ignore[arg-type]
        round=k,
        summary=summarize(records, duration),
        ttft_s=ttfts,
    )


def test_comparison_math() -> None:
    passes = [
        _pass("direct", 0, [0.100, 0.100], 10, 1.0),
        _pass("gateway", 0, [0.102, 0.104], 10, 1.0),
        _pass("gateway", 1, [0.110, 0.112], 10, 1.5),
        _pass("direct", 1, [0.100, 0.100], 10, 1.0),
    ]
    c = compare(passes, target_pct=5.0)
    assert c.direct.ttft_ms.mean == pytest.approx(100.0)
    assert c.gateway.ttft_ms.mean == pytest.approx(107.0)
    assert c.gateway.ttft_ms.p50 == pytest.approx(107.0)
    assert c.ttft_mean_ratio == pytest.approx(1.07)
    assert c.added_ttft_ms == pytest.approx(7.0)
    assert c.added_ttft_pct == pytest.approx(7.0)
    assert c.within_target is False
    # Throughput: 40 tokens over 2.0 s direct, 40 over 2.5 s through the gateway.
    assert c.direct.output_throughput == pytest.approx(20.0)
    assert c.gateway.output_throughput == pytest.approx(16.0)
    assert c.throughput_ratio == pytest.approx(0.8)
    assert c.round_ttft_ratios == pytest.approx([1.03, 1.11])
    assert compare(passes, target_pct=10.0).within_target is True
    assert "ABOVE the 5% target" in format_report({"comparison": c.model_dump(mode="json")})


def test_comparison_without_data() -> None:
    c = compare([], target_pct=5.0)
    assert c.ttft_mean_ratio is None and c.within_target is None and c.round_ttft_ratios == []
    assert "no data for" in format_report({"comparison": c.model_dump(mode="json")})


def test_pick_instance() -> None:
    one = {"id": "both-0", "url": "http://h:1", "healthy": True}
    sick = {"id": "both-1", "url": "http://h:2", "healthy": False}
    assert pick_instance([one, sick]) == one
    with pytest.raises(RuntimeError, match="exactly one"):
        pick_instance([one, {**sick, "healthy": True}])
    with pytest.raises(RuntimeError, match="exactly one"):
        pick_instance([sick])
    assert pick_instance([one, {**sick, "healthy": True}], "http://h:1/") == one
    with pytest.raises(RuntimeError, match="no healthy instance"):
        pick_instance([one, sick], "http://h:2")


def test_the_started_cluster_is_one_both_instance() -> None:
    args = serve_args(OverheadSettings(model="/m"), ["--max-num-seqs", "8"])
    assert args == [
        "--prefill", "0", "--decode", "0", "--both", "1", "--model", "/m", "--max-num-seqs", "8",
    ]  # fmt: skip


def _admin(instance: FakeEndpoint) -> Any:
    return lambda gateway: [
        {
            "id": "both-0",
            "role": "both",
            "url": instance.url,
            "healthy": True,
            "model": "fake-model",
        }
    ]


def test_run_measures_the_gateways_delay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    instance = FakeEndpoint(api_key=instance_api_key(SECRET.encode()))
    gateway = FakeEndpoint(first_token_delay_s=GATEWAY_DELAY_S, admin_rows=_admin(instance))
    with serving(instance, gateway):
        settings = OverheadSettings(
            url=gateway.url,
            requests=6,
            concurrency=2,
            prompt_tokens=16,
            output_tokens=4,
            rounds=2,
            warmup_requests=2,
            progress=False,
            json_out=str(tmp_path / "overhead.json"),
        )
        result = run(settings)
    # 2 warm-up + 2 rounds x 6 requests on each side.
    assert len(instance.seen) == len(gateway.seen) == 2 + 2 * 6
    assert {len(p["prompt"]) for p in instance.seen} == {16}
    # The same requests' shapes on both sides, but never the same prompt twice.
    prompts = [tuple(p["prompt"]) for p in instance.seen + gateway.seen]
    assert len(set(prompts)) == len(prompts)
    c = result["comparison"]
    assert c["direct"]["completed"] == c["gateway"]["completed"] == 12
    assert c["added_ttft_ms"] >= GATEWAY_DELAY_S * 1000 * 0.8
    assert c["ttft_mean_ratio"] > 1.5 and c["within_target"] is False
    assert c["throughput_ratio"] < 1.0
    assert [(p["round"], p["side"]) for p in result["passes"]] == [
        (0, "direct"), (0, "gateway"), (1, "gateway"), (1, "direct"),
    ]  # fmt: skip
    assert result["instance"]["url"] == instance.url
    assert json.loads((tmp_path / "overhead.json").read_text()) == json.loads(json.dumps(result))


def test_pdserve_bench_overhead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    instance = FakeEndpoint(api_key=instance_api_key(SECRET.encode()))
    gateway = FakeEndpoint(admin_rows=_admin(instance))
    out = tmp_path / "o.json"
    with serving(instance, gateway):
        code = pdserve_main(
            [
                "bench", "overhead", "--url", gateway.url, "--requests", "4",
                "--concurrency", "2", "--prompt-tokens", "8", "--output-tokens", "3",
                "--rounds", "2", "--warmup-requests", "0", "--no-progress", "--json", str(out),
            ]
        )  # fmt: skip
        assert code == 0
        assert "gateway/direct: mean TTFT" in capsys.readouterr().out
        assert json.loads(out.read_text())["settings"]["rounds"] == 2
        # A wrong cluster secret: the instance refuses every direct request.
        monkeypatch.setenv(SECRET_ENV, "another-secret")
        code = pdserve_main(
            ["bench", "overhead", "--url", gateway.url, "--requests", "2", "--rounds", "1",
             "--warmup-requests", "0", "--no-progress"]
        )  # fmt: skip
        assert code == 1
    # vLLM arguments make no sense with --url: nothing would receive them.
    assert pdserve_main(["bench", "overhead", "--url", "http://x", "--max-num-seqs", "4"]) == 2


def test_run_starts_one_both_instance_and_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_fake_serve(monkeypatch, tmp_path)
    monkeypatch.setenv("FAKE_GATEWAY_DELAY_S", "0.03")
    monkeypatch.delenv(SECRET_ENV, raising=False)
    logs = tmp_path / "logs"
    settings = OverheadSettings(
        requests=4,
        concurrency=2,
        prompt_tokens=8,
        output_tokens=3,
        rounds=2,
        warmup_requests=1,
        model="/models/m",
        log_dir=str(logs),
        start_timeout_s=60,
        progress=False,
    )
    result = run(settings, ["--max-num-seqs", "4"])
    serve = json.loads((logs / "fake-serve.json").read_text())
    argv = serve["argv"]
    assert argv[0] == "serve" and argv[argv.index("--log-dir") + 1] == str(logs)
    assert argv[argv.index("--port") + 1] in result["gateway_url"]
    assert argv[-10:] == [
        "--prefill", "0", "--decode", "0", "--both", "1", "--model", "/models/m",
        "--max-num-seqs", "4",
    ]  # fmt: skip
    assert len(serve["secret"]) >= 32  # a fresh secret, which the direct requests derived from
    c = result["comparison"]
    assert c["direct"]["completed"] == c["gateway"]["completed"] == 8
    assert c["added_ttft_ms"] > 20
    assert not psutil.pid_exists(serve["pid"])  # stopped when the run ended
