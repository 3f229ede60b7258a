"""``pdserve profile`` against a fake vLLM on loopback whose steps take a known linear time.

The fake runs a small engine loop like vLLM v1's: every step decodes one token of each running
sequence and fills the rest of the token budget with prompt chunks, sleeps what the known
coefficients say the step costs, then streams the tokens. The fit must recover them.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pdserve.cli import main as cli_main
from pdserve.sim import measure
from pdserve.sim.measure import (
    BUNDLED_KV_BYTES_PER_TOKEN,
    InstanceInfo,
    ProfileSettings,
    decode_sample,
    kv_bytes_from_config,
    link_from_points,
    link_from_results,
    plan,
    prefill_steps,
    prometheus_labels,
    resolve_kv_bytes,
)
from pdserve.sim.profile import StepWork, load_profile
from tests.unit.test_sim_profile import OVERHEAD_S, TRUE

BUDGET = 2048
METRICS = (
    "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
    "# TYPE vllm:cache_config_info gauge\n"
    'vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",'
    'engine="0",num_gpu_blocks="4097",prefix_caching_hash_algo="sha256"} 1.0\n'
)


@dataclass
class Seq:
    prompt: int
    max_tokens: int
    tokens: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    computed: int = 0
    generated: int = 0


@dataclass
class FakeEngine:
    """vLLM v1's step loop, reduced: decodes first, then prompt chunks within the budget."""

    running: list[Seq] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    steps: int = 0

    def add(self, seq: Seq) -> None:
        self.running.append(seq)
        self.wake.set()

    async def loop(self) -> None:
        while True:
            if not self.running:
                self.wake.clear()
                await self.wake.wait()
                continue
            decoding = [s for s in self.running if s.computed == s.prompt]
            budget = BUDGET - len(decoding)
            work = StepWork(
                decode_seqs=len(decoding),
                decode_context_tokens=sum(s.prompt + s.generated for s in decoding),
            )
            chunks: list[tuple[Seq, int]] = []
            for seq in self.running:
                if seq.computed < seq.prompt and budget > 0:
                    chunk = min(budget, seq.prompt - seq.computed)
                    chunks.append((seq, chunk))
                    budget -= chunk
                    work = StepWork(
                        work.prefill_tokens + chunk,
                        work.prefill_attention + StepWork.chunk_attention(chunk, seq.computed),
                        work.decode_seqs,
                        work.decode_context_tokens,
                    )
            c = TRUE
            seconds = (
                c.base_s
                + c.prefill_token_s * work.prefill_tokens
                + c.attention_pair_s * work.prefill_attention
                + c.decode_seq_s * work.decode_seqs
                + c.decode_context_s * work.decode_context_tokens
            )
            deadline = time.perf_counter() + seconds
            await asyncio.sleep(seconds)
            while time.perf_counter() < deadline:  # sleep may wake a little early
                await asyncio.sleep(0)
            self.steps += 1
            produced = list(decoding)
            for seq, chunk in chunks:
                seq.computed += chunk
                if seq.computed == seq.prompt:
                    produced.append(seq)
            for seq in produced:
                seq.generated += 1
                seq.tokens.put_nowait(seq.generated)
                if seq.generated == seq.max_tokens:
                    seq.tokens.put_nowait(None)
                    self.running.remove(seq)


@dataclass
class FakeVllm:
    url: str = ""
    engine: FakeEngine = field(default_factory=FakeEngine)
    task: asyncio.Task[None] | None = None
    payloads: list[dict[str, Any]] = field(default_factory=list)

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": "fake-model", "root": "/nonexistent/fake-model", "max_model_len": 4096}
        return web.json_response({"object": "list", "data": [card]})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=METRICS)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        self.payloads.append({k: v for k, v in payload.items() if k != "prompt"})
        await asyncio.sleep(OVERHEAD_S)  # input processing, outside the engine's steps
        seq = Seq(len(payload["prompt"]), payload["max_tokens"])
        self.engine.add(seq)
        if not payload.get("stream"):
            while await seq.tokens.get() is not None:
                pass
            return web.json_response({"choices": [{"index": 0, "text": "x"}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while (token := await seq.tokens.get()) is not None:
            chunk = {"choices": [{"index": 0, "text": f"t{token}", "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


@pytest.fixture
def fake() -> Iterator[FakeVllm]:
    server = FakeVllm()
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/v1/models", server.models)
    app.router.add_get("/metrics", server.metrics)
    app.router.add_post("/v1/completions", server.completions)
    runner = web.AppRunner(app, shutdown_timeout=0.1)

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        server.engine.wake = asyncio.Event()
        server.task = loop.create_task(server.engine.loop())

    loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield server

    async def stop() -> None:
        assert server.task is not None
        server.task.cancel()
        await runner.cleanup()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()


def settings(fake: FakeVllm, tmp_path: Path, **extra: Any) -> ProfileSettings:
    base: dict[str, Any] = {
        "url": fake.url,
        "output": str(tmp_path / "fake.json"),
        "prefill_tokens": "16,64,256,1024,2048,3000",
        "batch_sizes": "1,4,16",
        "context_lengths": "64,512",
        "decode_tokens": 12,
        "repeats": 2,
        "warmup_requests": 1,
        "kv_bytes_per_token": 1000,
        "link_gbps": 8.0,
        "progress": False,
    }
    return ProfileSettings(**(base | extra))


def test_the_fit_recovers_the_fake_engines_coefficients(fake: FakeVllm, tmp_path: Path) -> None:
    profile = measure.measure(settings(fake, tmp_path))
    c = profile.coefficients
    # The fake's own work (its step loop, HTTP) adds to the step and to the request overhead.
    assert TRUE.base_s - 0.0005 < c.base_s < TRUE.base_s + 0.002
    assert c.prefill_token_s == pytest.approx(TRUE.prefill_token_s, rel=0.15)
    assert c.attention_pair_s == pytest.approx(TRUE.attention_pair_s, rel=0.4)
    assert c.decode_seq_s == pytest.approx(TRUE.decode_seq_s, rel=0.25)
    assert c.decode_context_s == pytest.approx(TRUE.decode_context_s, rel=0.25)
    assert OVERHEAD_S - 0.001 < profile.request_overhead_s < OVERHEAD_S + 0.005
    assert profile.fit is not None and profile.fit.median_rel_error < 0.1
    # What the simulator asks of it, against the fake's truth.
    for work in (
        StepWork(512, StepWork.chunk_attention(512, 0)),
        StepWork(2048, StepWork.chunk_attention(2048, 0)),
        StepWork(decode_seqs=8, decode_context_tokens=8 * 300),
    ):
        truth = TRUE.base_s + (
            TRUE.prefill_token_s * work.prefill_tokens
            + TRUE.attention_pair_s * work.prefill_attention
            + TRUE.decode_seq_s * work.decode_seqs
            + TRUE.decode_context_s * work.decode_context_tokens
        )
        assert profile.step_seconds(work) == pytest.approx(truth, rel=0.12)
    assert profile.source == "measured" and profile.model == "fake-model"
    assert (profile.block_size, profile.num_blocks, profile.max_model_len) == (16, 4096, 4096)
    assert profile.kv_bytes_per_token == 1000 and profile.link_bandwidth_bytes_per_s == 1e9
    sent = fake.payloads[-1]
    assert sent["ignore_eos"] is True and sent["stream"] is True
    # The last decode point, 16 x 512: 4 chunks of prompts, so 12 + 4 + 1 tokens each.
    assert sent["max_tokens"] == measure.stream_tokens(settings(fake, tmp_path), 16, 512) == 17


def test_the_command_writes_a_loadable_profile(
    fake: FakeVllm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "cli.json"
    argv = ["profile", "--url", fake.url, "--output", str(output), "--prefill-tokens", "16,256"]
    argv += ["--batch-sizes", "1,2", "--context-lengths", "32", "--decode-tokens", "8"]
    argv += ["--repeats", "1", "--kv-bytes-per-token", "500", "--link-gbps", "1"]
    argv += ["--link-latency-ms", "2", "--no-progress", "--hardware", "loopback fake"]
    assert cli_main(argv) == 0
    profile = load_profile(str(output))
    assert profile.name == "cli" and profile.hardware == "loopback fake"
    assert profile.link_latency_s == pytest.approx(0.002)
    assert "relative error median" in capsys.readouterr().out
    assert cli_main(["profile", "--url", fake.url, "--batch-sizes", "0,x"]) == 2


def test_prefill_steps_are_chunks_of_the_budget() -> None:
    assert prefill_steps(100, 2048) == (StepWork(100, 100 * 50),)
    first, second = prefill_steps(3000, 2048)
    assert first == StepWork(2048, 2048 * 1024)
    assert second == StepWork(952, 952 * (2048 + 476))


def test_decode_sample_uses_the_window_where_every_stream_decodes() -> None:
    # Stream 0 starts decoding at 0.0, stream 1 only at 0.1 (its prompt came second).
    streams = [[0.0, 0.05, 0.1, 0.12, 0.14, 0.16, 0.18], [0.1, 0.12, 0.14, 0.16, 0.18, 0.2]]
    sample = decode_sample(2, 100, streams, "x")
    assert sample is not None and sample.seconds == pytest.approx(0.02)
    (work,) = sample.steps
    assert work.decode_seqs == 2 and 2 * 101 <= work.decode_context_tokens <= 2 * 106
    assert decode_sample(2, 100, [[0.0, 0.1], [0.05, 0.1]]) is None


def test_instance_facts_from_metrics_and_config(tmp_path: Path) -> None:
    labels = prometheus_labels(METRICS, "vllm:cache_config_info")
    assert labels is not None and labels["num_gpu_blocks"] == "4097"
    assert labels["block_size"] == "16" and labels["cache_dtype"] == "auto"
    assert prometheus_labels("other 1\n", "vllm:cache_config_info") is None
    smollm = {
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_size": 576,
        "torch_dtype": "float32",
    }
    (tmp_path / "config.json").write_text(json.dumps(smollm))
    assert kv_bytes_from_config(tmp_path) == BUNDLED_KV_BYTES_PER_TOKEN == 46_080
    assert kv_bytes_from_config(tmp_path / "config.json", "fp8_e4m3") == 46_080 // 4


def test_kv_bytes_for_the_bundled_model_without_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pdserve import bundled_model

    monkeypatch.setattr(bundled_model, "model_dir", lambda: tmp_path / "absent")
    info = InstanceInfo(bundled_model.MODEL_NAME, "/absent", 2048, 16, 100, "auto")
    assert resolve_kv_bytes(ProfileSettings(), info)[0] == BUNDLED_KV_BYTES_PER_TOKEN
    other = InstanceInfo("someone/else", None, 2048, 16, 100, "auto")
    with pytest.raises(ValueError, match="--kv-bytes-per-token"):
        resolve_kv_bytes(ProfileSettings(), other)
    assert resolve_kv_bytes(ProfileSettings(kv_bytes_per_token=7), other) == (
        7,
        "--kv-bytes-per-token",
    )


def test_link_from_kv_transfer_results(tmp_path: Path) -> None:
    bandwidth, latency = 2e9, 0.003
    sizes = [4 * 2**20, 64 * 2**20]
    rows = [
        {"payload_mib": s / 2**20, "connector_gib_s": s / (latency + s / bandwidth) / 2**30}
        for s in sizes
    ]
    (tmp_path / "kv.json").write_text(json.dumps(rows))
    (tmp_path / "other.json").write_text(json.dumps({"not": "kv"}))
    found = link_from_results([tmp_path])
    assert found is not None
    assert found[0] == pytest.approx(bandwidth, rel=1e-6)
    assert found[1] == pytest.approx(latency, rel=1e-6)
    assert "kv.json" in found[2]
    assert link_from_points([(1e6, 0.001)]) == (pytest.approx(1e9), 0.0)
    # The figures committed from this machine's runs are sensible.
    committed = link_from_results(measure.default_kv_results())
    assert committed is not None and 1e8 < committed[0] < 1e11


def test_the_grid_is_cut_to_the_instance() -> None:
    grid = plan(
        ProfileSettings(
            prefill_tokens="16,4096", batch_sizes="1,64,256", context_lengths="512,4000"
        ),
        max_model_len=2048,
        capacity_tokens=20_000,
    )
    assert grid.prefill == [16, 2047]
    assert grid.decode == [(1, 512)]
    assert len(grid.skipped) == 5
