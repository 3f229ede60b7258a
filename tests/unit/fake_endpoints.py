"""Fake OpenAI streaming endpoints on loopback, for the benchmarks' unit tests.

A ``FakeEndpoint`` streams ``max_tokens`` one-token chunks and a usage chunk, like vLLM, after
an optional extra delay before the first token (a stand-in for a gateway's overhead); it can
serve ``/admin/instances`` with rows that the test controls, and counts the KV blocks of the
requests it is serving, so a soak sees them come and go.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

BLOCKS_PER_REQUEST = 2
TOTAL_BLOCKS = 1000


@dataclass
class FakeEndpoint:
    api_key: str | None = None
    first_token_delay_s: float = 0.0
    token_gap_s: float = 0.002
    model: str = "fake-model"
    # Every n-th completion fails with 503 (0: none).
    fail_every: int = 0
    # KV blocks that stay used after the requests end (a leak).
    leaked_blocks: int = 0
    admin_rows: Callable[[FakeEndpoint], list[dict[str, Any]]] | None = None
    url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)
    running: int = 0
    served: int = 0

    def used_blocks(self) -> int:
        return self.running * BLOCKS_PER_REQUEST + (self.leaked_blocks if self.served else 0)

    def _authorized(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == (
            f"Bearer {self.api_key}"
        )

    async def models(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response({"object": "list", "data": [{"id": self.model}]})

    async def admin(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        rows = self.admin_rows(self) if self.admin_rows else []
        return web.json_response(rows)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        payload = await request.json()
        self.seen.append(payload)
        if self.fail_every and len(self.seen) % self.fail_every == 0:
            return web.json_response({"error": {"message": "busy"}}, status=503)
        self.running += 1
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await asyncio.sleep(self.first_token_delay_s)
            for i in range(payload["max_tokens"]):
                if i:
                    await asyncio.sleep(self.token_gap_s)
                chunk = {"choices": [{"index": 0, "text": f"t{i}", "finish_reason": None}]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            usage = {"completion_tokens": payload["max_tokens"]}
            await response.write(
                f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            )
            await response.write(b"data: [DONE]\n\n")
            return response
        finally:
            self.running -= 1
            self.served += 1


@contextmanager
def serving(
    *endpoints: FakeEndpoint, ports: tuple[int, ...] = ()
) -> Iterator[tuple[FakeEndpoint, ...]]:
    """Runs the endpoints on loopback (on ``ports``, else free ones) in a background loop."""
    loop = asyncio.new_event_loop()
    runners = []

    async def start(fake: FakeEndpoint, port: int) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/v1/models", fake.models)
        app.router.add_post("/v1/completions", fake.completions)
        app.router.add_get("/admin/instances", fake.admin)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return runner

    for i, fake in enumerate(endpoints):
        port = ports[i] if i < len(ports) else 0
        runners.append(loop.run_until_complete(start(fake, port)))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield endpoints
    finally:
        for runner in runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


def use_fake_serve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Makes ``benchmark.local_cluster`` start ``fake_serve_script.py`` instead of pdserve.

    The copy is named ``pdserve``, so the soak test labels it as the real launcher.
    """
    script = tmp_path / "bin" / "pdserve"
    script.parent.mkdir()
    shutil.copy(Path(__file__).with_name("fake_serve_script.py"), script)
    monkeypatch.setenv("FAKE_SERVE_REPO", str(Path(__file__).resolve().parents[2]))
    monkeypatch.setattr(
        "benchmark.local_cluster.pdserve_argv", lambda *args: [sys.executable, str(script), *args]
    )
