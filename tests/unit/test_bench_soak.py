"""The soak test: its pure parts, and short soaks against a fake gateway."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import psutil
import pytest

from benchmark.soak import (
    Counters,
    InstanceSample,
    ProcInfo,
    Sample,
    SoakSettings,
    arrival_times,
    drain_result,
    error_kind,
    expected_instances,
    format_summary,
    instance_sample,
    label_processes,
    memory_growth,
    run,
    summarize_soak,
)
from pdserve.cli import main as pdserve_main
from pdserve.workload.metrics import RequestRecord
from tests.unit.fake_endpoints import TOTAL_BLOCKS, FakeEndpoint, serving, use_fake_serve


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ('HTTP 503: {"error": ...}', "HTTP 503"),
        ("HTTP 429: too many", "HTTP 429"),
        ('{"message": "KV pull failed", "code": 500}', "stream error 500"),
        ('{"message": "x"}', "stream error"),
        ("{not json", "stream error"),
        ("cancelled: the run's time limit was reached", "cancelled"),
        ("stream ended without a token", "no token"),
        ("TimeoutError: ", "TimeoutError"),
        ("ClientConnectorError: Cannot connect to host 127.0.0.1:1", "ClientConnectorError"),
        (
            "aiohttp.client_exceptions.ServerDisconnectedError: gone",
            "aiohttp.client_exceptions.ServerDisconnectedError",
        ),
        ("", "unknown"),
    ],
)
def test_error_kinds(error: str, kind: str) -> None:
    assert error_kind(error) == kind


def test_counters() -> None:
    c = Counters(sent=4)
    c.add(
        RequestRecord(index=0, input_len=1, output_len=3, ttft_s=0.1, output_tokens=3, success=True)
    )
    c.add(RequestRecord(index=1, input_len=1, output_len=3, error="HTTP 503: busy"))
    c.add(RequestRecord(index=2, input_len=1, output_len=3, error="HTTP 503: busy"))
    assert (c.completed, c.failed, c.in_flight, c.output_tokens) == (1, 2, 1, 3)
    assert c.errors == {"HTTP 503": 2} and c.ttft_s == [0.1]


def test_instance_sample_counts_used_blocks() -> None:
    row = {"id": "d-0", "role": "decode", "healthy": True, "free_blocks": 90, "total_blocks": 100}
    assert instance_sample(row).used_blocks == 10
    assert instance_sample({"id": "p-0", "free_blocks": None}).used_blocks is None


def test_processes_are_labelled_by_their_pdserve_ancestor() -> None:
    py = "/venv/bin/python"
    procs = [
        ProcInfo(10, 1, "python", (py, "-m", "pdserve.cli", "serve", "--prefill", "1"), 100),
        ProcInfo(11, 10, "python", (py, "-m", "pdserve.cli", "gateway", "--port", "8000"), 200),
        ProcInfo(
            12,
            10,
            "python",
            (py, "-m", "pdserve.cli", "instance", "--role", "decode", "--instance-id", "decode-0"),
            300,
        ),
        ProcInfo(13, 12, "VLLM::EngineCor", ("VLLM::EngineCore",), 400),
        ProcInfo(14, 13, "python", (py, "-c", "from multiprocessing..."), 50),
        ProcInfo(15, 10, "python", ("/usr/bin/pdserve", "instance", "--instance-id=p-0"), 60),
        ProcInfo(16, 99, "stray", ("stray",), 1),
    ]
    assert label_processes(procs) == {
        "serve [10]": 100,
        "gateway [11]": 200,
        "decode-0 [12]": 300,
        "decode-0/VLLM::EngineCor [13]": 400,
        "decode-0/python [14]": 50,
        "p-0 [15]": 60,
        "stray [16]": 1,
    }


def _sample(
    t: float, rss: dict[str, float], used: dict[str, int | None], phase: str = "load"
) -> Sample:
    return Sample(
        t_s=t,
        phase=phase,  # type: ignore[arg-type]
        sent=0, completed=0, failed=0, in_flight=0, errors={},
        instances=[InstanceSample(id=k, used_blocks=v) for k, v in used.items()],
        rss_mib=rss,
    )  # fmt: skip


def test_memory_growth_from_the_first_sample_after_warmup() -> None:
    samples = [
        _sample(0, {"gw [1]": 100, "d [2]": 500}, {}),
        _sample(10, {"gw [1]": 150, "d [2]": 800}, {}),
        _sample(20, {"gw [1]": 160, "d [2]": 800, "d [3]": 700}, {}),  # d restarted as pid 3
        _sample(3610, {"gw [1]": 170, "d [3]": 720}, {}),
    ]
    growth = memory_growth(samples, warmup_s=10)
    assert growth["gw [1]"].first_mib == 150 and growth["gw [1]"].growth_mib == 20
    assert growth["gw [1]"].mib_per_hour == pytest.approx(20 / (3600 / 3600))
    assert growth["d [2]"].growth_mib == 0 and not growth["d [2]"].alive_at_end
    assert growth["d [3]"].first_t_s == 20 and growth["d [3]"].growth_mib == 20
    # A run shorter than the warm-up: the first sample is the baseline.
    assert memory_growth(samples[:2], warmup_s=100)["gw [1]"].growth_mib == 50
    assert memory_growth([], 0) == {}


def test_drain_result() -> None:
    polls = [
        _sample(100, {}, {"p": 4, "d": 2}, "drain"),
        _sample(103.5, {}, {"p": 0, "d": 0}, "drain"),
    ]
    assert drain_result(polls, 60).model_dump() == {
        "seconds": 3.5,
        "drained": True,
        "leaked_blocks": {},
    }
    leaked = drain_result([_sample(100, {}, {"p": 0, "d": 3}, "drain")], 60)
    assert leaked.drained is False and leaked.leaked_blocks == {"d": 3} and leaked.seconds == 60
    unknown = drain_result([_sample(100, {}, {"p": None}, "drain")], 60)
    assert unknown.drained is False and unknown.leaked_blocks == {"p": -1}
    assert drain_result([], 60).drained is False
    assert drain_result([_sample(1, {}, {}, "drain")], 60).drained is False  # no instance


def test_arrival_times() -> None:
    times = arrival_times(rate=5.0, duration_s=60.0, seed=3)
    assert all(0 <= t < 60 for t in times) and times == sorted(times)
    assert 200 < len(times) < 400  # Poisson(300)
    assert arrival_times(5.0, 60.0, 3) == times
    assert arrival_times(1000.0, 0.01, 0)[0] == 0.0


def test_summary_flags_every_problem() -> None:
    settings = SoakSettings(max_error_rate=0.1, max_rss_growth_mib=50, warmup_s=0)
    counters = Counters(sent=10, completed=8, failed=2)
    counters.errors.update({"HTTP 503": 2})
    samples = [
        _sample(0, {"gw [1]": 100}, {"d": 0}),
        _sample(5, {"gw [1]": 120}, {"d": 30}),
        _sample(10, {"gw [1]": 200}, {"d": 5}, "drain"),
    ]
    s = summarize_soak(settings, 2.0, 1.4, 10.0, counters, samples)
    assert (s.achieved_rps, s.error_rate, s.peak_used_blocks) == (1.0, 0.2, {"d": 30})
    assert s.max_growth_mib == 100 and not s.ok
    assert len(s.problems) == 3
    text = format_summary({"summary": s.model_dump(mode="json")})
    assert "FAIL" in text and "error rate 20.00%" in text and "{'d': 5}" in text
    good = summarize_soak(
        SoakSettings(warmup_s=0), 2.0, 1.4, 10.0, Counters(sent=3, completed=3),
        [_sample(0, {"gw [1]": 100}, {"d": 3}), _sample(10, {"gw [1]": 101}, {"d": 0}, "drain")],
    )  # fmt: skip
    assert good.ok and good.problems == []
    assert format_summary({"summary": good.model_dump(mode="json")}).endswith("PASS")


def test_expected_instances_follow_pdserve_serve() -> None:
    assert expected_instances([]) == 2  # 1 prefill + 1 decode by default
    assert expected_instances(["--prefill", "2", "--decode", "3", "--max-num-seqs", "8"]) == 5
    assert expected_instances(["--prefill", "0", "--decode", "0", "--both", "1"]) == 1


def _admin_rows(fake: FakeEndpoint) -> list[dict[str, Any]]:
    """Two 'instances' that share the fake's used blocks; pid: this test process."""
    used = fake.used_blocks()
    return [
        {
            "id": name,
            "role": role,
            "healthy": True,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "free_blocks": TOTAL_BLOCKS - used,
            "total_blocks": TOTAL_BLOCKS,
            "num_running": fake.running,
            "num_waiting": 0,
        }
        for name, role in (("prefill-0", "prefill"), ("decode-0", "decode"))
    ]


def _settings(url: str | None, tmp_path: Path, **extra: Any) -> SoakSettings:
    base: dict[str, Any] = {
        "url": url,
        "minutes": 0.04,
        "fraction": 0.2,
        "probe_requests": 8,
        "probe_concurrency": 4,
        "prompt_tokens": 8,
        "output_tokens": 4,
        "sample_interval_s": 0.5,
        "warmup_s": 0,
        "drain_timeout_s": 2,
        "max_rss_growth_mib": 10_000,
        "progress": False,
        "json_out": str(tmp_path / "soak.json"),
    }
    return SoakSettings(**(base | extra))


def test_a_short_soak_passes_on_a_healthy_gateway(tmp_path: Path) -> None:
    with serving(FakeEndpoint(token_gap_s=0.01, admin_rows=_admin_rows)) as (fake,):
        result = run(_settings(fake.url, tmp_path))
    s = result["summary"]
    assert s["ok"], s["problems"]
    assert s["sent"] > 0 and s["completed"] == s["sent"] and s["failed"] == 0
    assert len(fake.seen) == 8 + s["sent"]  # probe + load
    assert s["capacity_rps"] > 0 and s["target_rps"] == pytest.approx(0.2 * s["capacity_rps"])
    assert s["drain"]["drained"] and s["drain"]["leaked_blocks"] == {}
    phases = [x["phase"] for x in result["samples"]]
    assert phases[0] == "load" and phases[-1] == "drain"
    # RSS of this process, found through the instance table's pid column.
    assert any(label.endswith(f"[{os.getpid()}]") for label in s["memory"])
    assert all(x["rss_mib"] for x in result["samples"])
    assert json.loads((tmp_path / "soak.json").read_text())["summary"]["ok"] is True


def test_a_soak_reports_leaked_blocks_and_errors(tmp_path: Path) -> None:
    fake = FakeEndpoint(fail_every=3, leaked_blocks=7, admin_rows=_admin_rows)
    with serving(fake):
        result = run(_settings(fake.url, tmp_path, max_error_rate=0.5))
    s = result["summary"]
    assert not s["ok"]
    assert s["drain"]["leaked_blocks"] == {"prefill-0": 7, "decode-0": 7}
    assert s["errors"].get("HTTP 503", 0) == s["failed"] > 0  # the probe's failures don't count
    assert any("KV blocks still used" in p for p in s["problems"])
    assert all(peak >= 7 for peak in s["peak_used_blocks"].values())


def test_pdserve_bench_soak(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serving(FakeEndpoint(admin_rows=_admin_rows)) as (fake,):
        code = pdserve_main(
            ["bench", "soak", "--url", fake.url, "--minutes", "0.02", "--fraction", "0.1",
             "--probe-requests", "4", "--prompt-tokens", "4", "--output-tokens", "2",
             "--sample-interval-s", "0.5", "--drain-timeout-s", "1", "--warmup-s", "0",
             "--max-rss-growth-mib", "10000", "--no-progress", "--json", str(tmp_path / "s.json")]
        )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS" in out and "RSS per process" in out
    # serve flags without a cluster to start are refused
    assert pdserve_main(["bench", "soak", "--url", fake.url, "--prefill", "2"]) == 2
    # a gateway without instances
    with serving(FakeEndpoint()) as (empty,):
        assert pdserve_main(["bench", "soak", "--url", empty.url, "--no-progress"]) == 1


def test_a_soak_of_a_cluster_it_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_serve(monkeypatch, tmp_path)
    logs = tmp_path / "logs"
    settings = _settings(None, tmp_path, log_dir=str(logs), api_key="gw-key")
    result = run(settings, ["--prefill", "0", "--decode", "0", "--both", "1"])
    serve = json.loads((logs / "fake-serve.json").read_text())
    assert serve["argv"][-8:] == [
        "--prefill", "0", "--decode", "0", "--both", "1", "--api-key", "gw-key",
    ]  # fmt: skip
    assert result["serve_args"] == ["--prefill", "0", "--decode", "0", "--both", "1"]
    s = result["summary"]
    assert s["ok"], s["problems"]
    # The launcher's process tree, labelled by its command line.
    assert f"serve [{serve['pid']}]" in s["memory"]
    assert not psutil.pid_exists(serve["pid"])
