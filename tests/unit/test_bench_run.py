"""The benchmark end to end against a tiny fake OpenAI SSE server on loopback."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from benchmark.plots import main as plots_main
from benchmark.run import RunSettings, add_run_arguments, main, run, settings_from_args
from pdserve.workload.metrics import PointResult
from tests.unit.compare_fakes import write_token_stream

TOKEN_GAP_S = 0.005
API_KEY = "secret"


@dataclass
class FakeServer:
    """Streams ``max_tokens`` one-token chunks, then a usage chunk, like vLLM."""

    url: str = ""
    payloads: list[dict[str, Any]] = field(default_factory=list)
    hang: bool = False

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return web.json_response({"error": "unauthorized"}, status=401)
        payload = await request.json()
        self.payloads.append(payload)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if self.hang:
            await asyncio.sleep(30)
        await write_token_stream(response, payload, TOKEN_GAP_S)
        return response


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/v1/models", fake.models)
    app.router.add_post("/v1/completions", fake.completions)
    runner = web.AppRunner(app, shutdown_timeout=0.1)

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"

    loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield fake
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()


def settings(server: FakeServer, tmp_path: Path, **extra: Any) -> RunSettings:
    base: dict[str, Any] = {
        "url": server.url,
        "api_key": API_KEY,
        "workload": "fixed",
        "input_len": 8,
        "output_len": 5,
        "num_requests": 4,
        "rate": [50.0, float("inf")],
        "slo_ttft_ms": 1000,
        "slo_tpot_ms": 1000,
        "output_dir": str(tmp_path),
        "progress": False,
        "time_limit_s": 20,
    }
    return RunSettings(**(base | extra))


def test_run_records_timings_and_writes_json_and_pngs(server: FakeServer, tmp_path: Path) -> None:
    result = run(settings(server, tmp_path))
    assert result["model"] == "fake-model"
    assert [p["load"] for p in result["points"]] == [50.0, float("inf")]
    sent = server.payloads[0]
    assert sent["model"] == "fake-model" and sent["prompt"] == [int(t) for t in sent["prompt"]]
    assert len(sent["prompt"]) == 8 and sent["max_tokens"] == 5 and sent["ignore_eos"] is True
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}

    files = sorted(tmp_path.glob("*.json"))
    assert [f.name for f in files] == ["pdserve-poisson-50.json", "pdserve-poisson-inf.json"]
    point = PointResult.model_validate(json.loads(files[0].read_text()))
    assert len(point.records) == 4 and not point.timed_out
    for r in point.records:
        assert r.success and r.output_tokens == 5 and len(r.itl_s) == 4
        assert r.ttft_s is not None and r.e2e_s is not None and 0 < r.ttft_s < r.e2e_s
        assert all(gap > 0 for gap in r.itl_s)
    s = point.summary
    assert s.completed == 4 and s.total_output_tokens == 20
    assert s.itl_ms.p50 is not None and s.itl_ms.p50 >= TOKEN_GAP_S * 1000 * 0.8
    assert s.slo_attainment == 1.0
    for png in result["plots"]:
        assert Path(png).read_bytes()[:4] == b"\x89PNG"
    assert {Path(p).name for p in result["plots"]} == {"latency_cdf.png", "sweep.png"}
    assert plots_main([str(tmp_path), "--output-dir", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "sweep.png").is_file()


def test_closed_loop_and_http_errors(server: FakeServer, tmp_path: Path) -> None:
    good = run(settings(server, tmp_path, arrival="closed", concurrency=[2], plots=False))
    assert good["points"][0]["summary"]["completed"] == 4 and good["plots"] == []
    bad = run(settings(server, tmp_path, api_key="wrong", model="m", rate=[100.0], plots=False))
    summary = bad["points"][0]["summary"]
    assert summary["failed"] == 4 and summary["slo_attainment"] == 0.0
    point = PointResult.model_validate(
        json.loads((tmp_path / "pdserve-poisson-100.json").read_text())
    )
    assert point.records[0].error.startswith("HTTP 401")


def test_time_limit_stops_the_run(server: FakeServer, tmp_path: Path) -> None:
    server.hang = True
    result = run(settings(server, tmp_path, rate=[float("inf")], time_limit_s=0.5, plots=False))
    point = result["points"][0]
    assert point["timed_out"] and point["summary"]["failed"] == 4
    assert point["summary"]["duration_s"] < 5


def test_cli_flags_come_from_the_settings_model(server: FakeServer, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    parsed = settings_from_args(
        parser.parse_args(["--rate", "1", "2.5", "--arrival", "gamma", "--burstiness", "0.5"])
    )
    assert parsed == RunSettings(rate=[1, 2.5], arrival="gamma", burstiness=0.5)
    argv = ["--url", server.url, "--api-key", API_KEY, "--workload", "fixed", "--input-len", "4"]
    argv += ["--output-len", "3", "--num-requests", "2", "--rate", "inf", "--no-progress"]
    argv += ["--no-plots", "--output-dir", str(tmp_path), "--label", "vllm baseline"]
    assert main(argv) == 0
    assert (tmp_path / "vllm_baseline-poisson-inf.json").is_file()
