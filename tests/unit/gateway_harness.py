"""A live gateway in this process, in front of fake vLLM instances (no vLLM, no GPU).

``LiveGateway`` runs the real gateway app (``create_app``: middlewares, lifespan, control
plane on a real ZeroMQ socket) under uvicorn on a loopback port, in a background thread with
its own event loop. ``FakeInstance`` answers ``/v1/completions`` and ``/v1/chat/completions``
the way vLLM 0.32 does for the gateway's requests: streamed with token ids (``data:`` events,
a usage chunk, ``[DONE]``), or in one JSON answer for a prefill leg, and errors in vLLM's
format for what vLLM would refuse. Instances join through ``ControlPlane.handle`` with
messages like the ones they push over the wire.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvicorn
from aiohttp import web

from pdserve.cluster.processes import free_port
from pdserve.gateway.app import create_app
from pdserve.gateway.context import GatewayContext
from pdserve.gateway.settings import GatewaySettings
from pdserve.kv.messages import (
    PARAMS_KEY,
    SourceSpec,
    TransferParams,
    params_to_json,
    tokens_digest,
)
from pdserve.protocol.reports import LoadReport, Register
from pdserve.protocol.wire import instance_api_key
from pdserve.scheduler.dispatch import DispatchSettings

SECRET = b"gateway-test-secret"
MODEL = "fake-model"
MAX_MODEL_LEN = 4096
VOCAB = 50_000
TOKENS_PER_ANSWER = 3

T = TypeVar("T")

# Typed fields vLLM checks on the requests the gateway forwards (a few, enough to exercise
# the path where an instance refuses a request the gateway let through).
_VLLM_TYPES: dict[str, tuple[type, ...]] = {
    "top_k": (int,),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
    "repetition_penalty": (int, float),
    "ignore_eos": (bool,),
    "skip_special_tokens": (bool,),
}


def _vllm_error(status: int, message: str) -> web.Response:
    error = {"message": message, "type": "BadRequestError", "param": None, "code": status}
    return web.json_response({"error": error}, status=status)


def _text_ids(text: str) -> list[int]:
    return [ord(c) % VOCAB for c in text[:64]] or [1]


class FakeInstance:
    """What the gateway sees of one vLLM instance; ``hold`` makes answers wait.

    ``exports``: a prefill leg answers with a KV source, as pdserve's connector does;
    ``pause_after_first``: streams wait on it after their first token; ``refuse_streams``:
    streamed requests are answered 503; ``control_address``: registered as the engine's.
    """

    def __init__(self, name: str, role: str, *, free_blocks: int = 1000) -> None:
        self.name = name
        self.role = role
        self.api_key = instance_api_key(SECRET)
        self.hold: asyncio.Event | None = None
        self.pause_after_first: asyncio.Event | None = None
        self.exports = False
        self.refuse_streams = False
        self.max_model_len = MAX_MODEL_LEN
        self.free_blocks = free_blocks
        self.control_address: str | None = None
        self.received: list[dict[str, Any]] = []
        self.headers: list[str] = []  # the X-Request-Id of each generate request
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)  # vLLM has no small limit
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/detokenize", self._detokenize)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_get("/version", self._version)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/v1/responses/{response_id}", self._response)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        for event in (self.hold, self.pause_after_first):
            if event is not None:
                event.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def registration(self) -> Register:
        return Register(
            instance_id=self.name,
            role=self.role,  # type: ignore[arg-type]
            url=self.url,
            host="127.0.0.1",
            pid=1,
            model=MODEL,
            kv_addresses=["tcp://127.0.0.1:9"],
            control_address=self.control_address,
            max_model_len=self.max_model_len,
            started_at=0.0,
        )

    def report(self) -> LoadReport:
        return LoadReport(
            instance_id=self.name,
            seq=1,
            num_running=0,
            num_waiting=0,
            num_loading=0,
            free_blocks=self.free_blocks,
            total_blocks=1000,
            block_size=16,
            waiting_prompt_tokens=0,
            waiting_blocks=0,
            step_ms=1.0,
            prefill_tokens_per_s=0.0,
            num_preemptions=0,
        )

    # --- vLLM's side -----------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def _detokenize(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        body = await request.json()
        return web.json_response({"prompt": "".join(f"<{t}>" for t in body["tokens"])})

    async def _tokenize(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        body = await request.json()
        if "prompt" not in body:
            return _vllm_error(400, "prompt is required")
        self.received.append(body)
        tokens = _text_ids(str(body["prompt"]))
        return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": 64})

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(body)
        answer = {"id": f"resp_{self.name}_{len(self.received)}", "object": "response"}
        if not body.get("stream"):
            return web.json_response(answer)
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        created = {"type": "response.created", "response": answer}
        await stream.write(f"event: response.created\ndata: {json.dumps(created)}\n\n".encode())
        await stream.write_eof()
        return stream

    async def _response(self, request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["response_id"], "from": self.name})

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": f"fake-{self.name}"})

    def _prompt_ids(self, chat: bool, body: dict[str, Any]) -> list[int] | str:
        """The prompt's token ids, or why vLLM would refuse the request."""
        if chat:
            params = (body.get("kv_transfer_params") or {}).get("prompt_token_ids")
            if params is not None:
                return list(params)
            text = ""
            for message in body["messages"]:
                content = message.get("content")
                text += content if isinstance(content, str) else json.dumps(content)
            return _text_ids(text)
        prompt = body["prompt"]
        if isinstance(prompt, str):
            return _text_ids(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            if any(t >= VOCAB for t in prompt):
                return f"token id out of vocabulary (size {VOCAB})"
            return list(prompt)
        return "prompt must be a string or token ids"

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        try:
            body = await request.json()
        except ValueError:
            return _vllm_error(400, "invalid JSON")
        self.received.append(body)
        self.headers.append(request.headers.get("X-Request-Id", ""))
        if self.hold is not None:
            await self.hold.wait()
        chat = request.path.endswith("/chat/completions")
        for key, types in _VLLM_TYPES.items():
            if key in body and not isinstance(body[key], types):
                return _vllm_error(400, f"{key}: wrong type")
        prompt_ids = self._prompt_ids(chat, body)
        if isinstance(prompt_ids, str):
            return _vllm_error(400, prompt_ids)
        budget = body.get("max_tokens") or body.get("max_completion_tokens")
        if budget is None:
            budget = self.max_model_len - len(prompt_ids)
        if len(prompt_ids) + budget > self.max_model_len:
            return _vllm_error(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens; "
                f"{len(prompt_ids)} prompt + {budget} output tokens requested",
            )
        count = min(budget, TOKENS_PER_ANSWER)
        tokens = [100 + i for i in range(count)]
        if not body.get("stream"):
            answer = self._answer(chat, prompt_ids, tokens[:1])
            if self.exports:
                answer["kv_transfer_params"] = self._export(body, prompt_ids)
            return web.json_response(answer)
        if self.refuse_streams:
            return _vllm_error(503, "the engine is not ready")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in self._events(chat, prompt_ids, tokens):
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            first_token = bool(event.get("choices")) and event["choices"][0].get("token_ids")
            if self.pause_after_first is not None and first_token:
                await self.pause_after_first.wait()
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _export(self, body: dict[str, Any], prompt_ids: list[int]) -> dict[str, Any] | None:
        """The KV source a prefill leg's answer names, as pdserve's connector writes it."""
        export = ((body.get("kv_transfer_params") or {}).get(PARAMS_KEY) or {}).get("export")
        if not export:
            return None
        source = SourceSpec(
            transfer_id=export["transfer_id"],
            instance_id=self.name,
            addresses=["tcp://127.0.0.1:9"],
            num_tokens=len(prompt_ids),
            block_size=16,
            cache_fingerprint="fake",
            tokens_digest=tokens_digest(prompt_ids),
        )
        return params_to_json(TransferParams(source=source))

    def _answer(self, chat: bool, prompt_ids: list[int], tokens: list[int]) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "token_ids": tokens,
        }
        answer: dict[str, Any] = {"id": "x", "created": 0, "model": MODEL}
        if chat:
            choice["message"] = {"role": "assistant", "content": "t" * len(tokens)}
            answer.update(object="chat.completion", prompt_token_ids=prompt_ids)
        else:
            choice.update(text="t" * len(tokens), prompt_token_ids=prompt_ids)
            answer["object"] = "text_completion"
        answer.update(choices=[choice], kv_transfer_params=None)
        return answer

    def _events(self, chat: bool, prompt_ids: list[int], tokens: list[int]) -> list[Any]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": "x", "object": kind, "created": 0, "model": MODEL}
        events: list[dict[str, Any]] = []
        if chat:
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}}
            events.append({**head, "choices": [role], "prompt_token_ids": prompt_ids})
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            choice: dict[str, Any] = {
                "index": 0,
                "logprobs": None,
                "finish_reason": "length" if last else None,
                "token_ids": [token],
            }
            if chat:
                choice["delta"] = {"content": f"t{token}"}
            else:
                choice["text"] = f"t{token}"
                if i == 0:
                    choice["prompt_token_ids"] = prompt_ids
            events.append({**head, "choices": [choice]})
        usage = {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(tokens),
            "total_tokens": len(prompt_ids) + len(tokens),
        }
        events.append({**head, "choices": [], "usage": usage})
        return events


class LiveGateway:
    """The gateway app served by uvicorn on 127.0.0.1, with fake instances joined."""

    def __init__(self, instances: list[FakeInstance] | None = None, **settings: Any) -> None:
        self.instances = instances if instances is not None else default_instances()
        values: dict[str, Any] = {
            "port": free_port(),
            "control_port": free_port(),
            # Fake instances report once; they stay healthy for the test's duration.
            "heartbeat_timeout_s": 3600.0,
            "dead_after_s": 7200.0,
            "forget_after_s": 7200.0,
        }
        values.update(settings)
        self.settings = GatewaySettings(**values)
        self.app = create_app(self.settings, DispatchSettings(), SECRET)
        self.ctx: GatewayContext = self.app.state.ctx
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: uvicorn.Server | None = None
        self._serving: concurrent.futures.Future[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def run(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 30) -> T:
        """Runs a coroutine on the gateway's event loop, from the test's thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def __enter__(self) -> LiveGateway:
        self._thread.start()
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.settings.port,
            # uvicorn's default log config runs logging.config.dictConfig, which closes every
            # handler in the process (pytest's too); with it, a later test's zmq context
            # termination aborted the test process in about 40% of runs.
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="on",
        )
        self._server = uvicorn.Server(config)
        self._serving = asyncio.run_coroutine_threadsafe(self._server.serve(), self.loop)
        deadline = time.monotonic() + 20
        while not self._server.started:
            if self._serving.done() or time.monotonic() > deadline:
                self._stop_loop()
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        self.run(self._join())
        return self

    async def _join(self) -> None:
        for instance in self.instances:
            await instance.start()
            self.ctx.control.handle(instance.registration())
            self.ctx.control.handle(instance.report())

    async def _leave(self) -> None:
        for instance in self.instances:
            await instance.stop()

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self._leave())
        finally:
            assert self._server is not None and self._serving is not None
            self._server.should_exit = True
            try:
                self._serving.result(timeout=20)
            finally:
                self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def default_instances() -> list[FakeInstance]:
    """One prefill and one decode instance: long prompts take the disaggregated path."""
    return [FakeInstance("prefill-0", "prefill"), FakeInstance("decode-0", "decode")]
