"""A tiny fake of an OpenAI server (vLLM, or pdserve's gateway) for the compare tests.

Streams ``max_tokens`` one-token chunks and a usage chunk like vLLM (each chunk with its
token id where ``return_token_ids`` asks), exposes vLLM's preemption counter on ``/metrics``
(one preemption per two requests) and its prefix-cache counters (every prompt token queried,
half of them found) and, as a gateway, pdserve's dispatch, migration and KV byte counters
(1000 bytes per request) and ``/admin/instances``. Runs in a thread of the test
(``serve_in_thread``) or as a process (``python compare_fakes.py PORT [--gateway N]``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TOKEN_GAP_S = 0.003
FIRST_ANSWER_ID = 1000  # the i-th token of every answer is this + i


def prompt_tokens(prompt: Any) -> int:
    """Tokens of a prompt as the fake counts them: ids, or words of a text."""
    return len(prompt.split()) if isinstance(prompt, str) else len(prompt)


async def write_token_stream(
    response: web.StreamResponse, payload: dict[str, Any], gap_s: float = TOKEN_GAP_S
) -> None:
    """What vLLM streams for a completion: one chunk per token, a usage chunk, [DONE]."""
    for i in range(payload["max_tokens"]):
        await asyncio.sleep(gap_s)
        choice: dict[str, Any] = {"index": 0, "text": f" t{i}", "finish_reason": None}
        if payload.get("return_token_ids"):
            choice["token_ids"] = [FIRST_ANSWER_ID + i]
        chunk = {"choices": [choice]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    usage = {"prompt_tokens": len(payload["prompt"]), "completion_tokens": payload["max_tokens"]}
    await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")


@dataclass
class Fake:
    url: str = ""
    gateway_instances: int = 0  # > 0: behave as a pdserve gateway with this many instances
    requests: int = 0
    queried: int = 0  # prompt tokens seen
    payloads: list[dict[str, Any]] = field(default_factory=list)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        self.payloads.append(payload)
        self.requests += 1
        self.queried += prompt_tokens(payload["prompt"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await write_token_stream(response, payload)
        return response

    async def metrics(self, request: web.Request) -> web.Response:
        lines = [
            "# TYPE vllm:num_preemptions_total counter",
            f'vllm:num_preemptions_total{{engine="0",model_name="fake-model"}} {self.requests // 2}.0',
            f'vllm:prefix_cache_queries_total{{engine="0",model_name="fake-model"}} {self.queried}.0',
            f'vllm:prefix_cache_hits_total{{engine="0",model_name="fake-model"}} '
            f"{self.queried // 2}.0",
        ]
        if self.gateway_instances:
            lines += [
                f'pdserve_dispatches_total{{mode="disaggregated"}} {self.requests}.0',
                f'pdserve_migrations_total{{result="started"}} {self.requests}.0',
                f'pdserve_migrations_total{{result="completed"}} {self.requests // 4}.0',
                f'pdserve_kv_received_bytes_total{{instance="both-0",role="both"}} '
                f"{1000 * self.requests}.0",
            ]
        return web.Response(text="\n".join(lines) + "\n")

    async def instances(self, request: web.Request) -> web.Response:
        rows = [
            {"id": f"both-{i}", "url": self.url, "healthy": True}
            for i in range(self.gateway_instances)
        ]
        return web.json_response(rows)

    async def sent(self, request: web.Request) -> web.Response:
        """The request bodies it received (tests read a fake process's with this)."""
        return web.json_response(self.payloads)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/payloads", self.sent)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/metrics", self.metrics)
        if self.gateway_instances:
            app.router.add_get("/admin/instances", self.instances)
        return app


@contextmanager
def serve_in_thread(gateway_instances: int = 0) -> Iterator[Fake]:
    fake = Fake(gateway_instances=gateway_instances)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(fake.app(), shutdown_timeout=0.1)

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"

    loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--gateway", type=int, default=0)
    args = parser.parse_args()
    fake = Fake(url=f"http://127.0.0.1:{args.port}", gateway_instances=args.gateway)
    web.run_app(fake.app(), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
