"""The OpenAI-compatible HTTP front end of a pdserve cluster.

Routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``, ``/metrics``,
vLLM's ``/tokenize``, ``/detokenize``, ``/version`` and ``/ping`` (``utility_api``),
``/v1/responses`` (``responses_api``),
``/admin/instances`` (and ``/admin/instances/{id}/drain|undrain``), ``/admin/migrate``,
``/admin/migrations``, ``/admin/requests`` and ``/admin/policy``. Every error is in
OpenAI's error format. Nothing a client sends reaches an instance unchecked, and a client that
goes away is noticed: its upstream requests are closed, which makes vLLM abort them and free
their KV blocks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.gateway.context import GatewayContext, SloShedding
from pdserve.gateway.control_plane import ControlPlane
from pdserve.gateway.errors import APIError
from pdserve.gateway.fanout import FanOut, folder_for, open_request
from pdserve.gateway.kv_client import KVControlClient
from pdserve.gateway.metrics import GatewayMetrics
from pdserve.gateway.migration import MIGRATION_MODES, Migrator
from pdserve.gateway.openai_api import (
    Kind,
    client_request_id,
    parse_json_body,
    parse_request,
    parse_service,
)
from pdserve.gateway.phases import Timeline, request_row
from pdserve.gateway.responses import SSE_DONE, sse
from pdserve.gateway.responses_api import add_responses_routes
from pdserve.gateway.session import STARTED, Cut, RequestSession, SessionRegistry
from pdserve.gateway.settings import GatewaySettings
from pdserve.gateway.tokens import context_error, estimate_for
from pdserve.gateway.upstream import Upstream
from pdserve.gateway.utility_api import add_utility_routes
from pdserve.logs import get_logger
from pdserve.protocol.reports import ROLES
from pdserve.protocol.wire import instance_api_key
from pdserve.scheduler.admission import TtftPredictor
from pdserve.scheduler.dispatch import (
    DescribedPolicy,
    DispatchSettings,
    Serving,
    make_policy,
    serving,
)
from pdserve.scheduler.rescheduling import ReschedulingSettings

logger = get_logger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health", "/ping"})


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    if headers is None:
        headers = []
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class BearerAuth:
    """Requires ``Authorization: Bearer KEY`` everywhere but ``/health``."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            error = APIError(401, "missing or wrong API key (Authorization: Bearer KEY)")
            await _send_json(send, 401, error.body(), [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, declared or not."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = APIError(413, f"request body larger than {self.limit} bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_json(send, 413, error.body())
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, error.body())


async def _read_body(request: Request) -> Any:
    return parse_json_body(await request.body())


def _check_model(ctx: GatewayContext, model: str | None) -> None:
    served = ctx.control.models()
    if not served:
        raise APIError(503, "no instance has joined the cluster yet", headers={"Retry-After": "2"})
    if model and model not in served:
        raise APIError(
            404, f"The model `{model}` does not exist. Served: {', '.join(served)}.", param="model"
        )


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _fold(
    session: RequestSession | FanOut, chunks: AsyncIterator[dict[str, Any]]
) -> Response:
    folder = folder_for(session)
    async for chunk in chunks:
        if "error" in chunk and "choices" not in chunk:
            return JSONResponse(
                {"error": chunk["error"]}, status_code=int(chunk["error"].get("code") or 500)
            )
        folder.add(chunk)
    return JSONResponse(folder.response())


async def _serve(kind: Kind, request: Request) -> Response:
    ctx: GatewayContext = request.app.state.ctx
    timeline = Timeline(time.perf_counter())
    endpoint = "chat" if kind == "chat" else "completions"
    parsed = parse_request(kind, await _read_body(request))
    service = parse_service(request.headers, parsed)
    _check_model(ctx, parsed.model)
    counted = await ctx.count_prompt(kind, parsed, parsed.model or ctx.default_model())
    timeline.mark_tokenized()
    too_long = context_error(counted)
    if too_long is not None:
        raise too_long
    ctx.admit(estimate_for(parsed, service, counted))
    slot: AbstractAsyncContextManager[None] = ctx.admission.slot()
    await slot.__aenter__()
    request_id = client_request_id(request.headers, parsed)
    session = open_request(
        ctx, request.app.state.sessions, kind, parsed, service, request_id, counted, timeline
    )
    chunks = session.generate()
    try:
        first = await chunks.__anext__()
        assert first is STARTED
    except BaseException:
        await chunks.aclose()
        await slot.__aexit__(None, None, None)
        raise
    ctx.metrics.requests.labels(endpoint, "accepted").inc()

    if session.client_stream:

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield sse(chunk)
                yield SSE_DONE
            finally:
                await chunks.aclose()
                await slot.__aexit__(None, None, None)
                _observe_end(ctx, session)

        headers = {"Cache-Control": "no-cache", "X-Request-Id": session.request_id}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    folding = asyncio.ensure_future(_fold(session, chunks))
    leaving = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({folding, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
        if not folding.done():
            folding.cancel()  # the client left: closing the generator aborts upstream work
        await asyncio.gather(folding, leaving, return_exceptions=True)
        await chunks.aclose()
        await slot.__aexit__(None, None, None)
        _observe_end(ctx, session)
    if folding.cancelled():
        return Response(status_code=499)
    answer = folding.result()
    answer.headers["X-Request-Id"] = session.request_id
    return answer


def _observe_end(ctx: GatewayContext, session: RequestSession | FanOut) -> None:
    if session.finish_reason is not None and session.last_token_at is not None:
        ctx.metrics.e2e_seconds.observe(session.last_token_at - session.arrived)


def instance_summary(ctx: GatewayContext, sessions: SessionRegistry) -> list[dict[str, Any]]:
    now = time.monotonic()
    rows = []
    for instance_id, record in ctx.control.instances.items():
        load = record.load
        info = record.info
        rows.append(
            {
                "id": instance_id,
                "role": info.role,
                "url": info.url,
                "host": info.host,
                "pid": info.pid,
                "model": info.model,
                "kv_addresses": info.kv_addresses,
                "control_address": info.control_address,
                "healthy": record.healthy,
                "draining": record.draining,
                "num_running": load.num_running if load else 0,
                "num_waiting": load.num_waiting if load else 0,
                "num_loading": load.num_loading if load else 0,
                "kv_usage": round(1 - load.free_blocks / max(1, load.total_blocks), 4)
                if load
                else None,
                "free_blocks": load.free_blocks if load else None,
                "total_blocks": load.total_blocks if load else None,
                "num_preemptions": load.num_preemptions if load else 0,
                "held_exports": record.holdings().held_exports,
                "open_pairs": record.holdings().open_pairs,
                "inflight_pulls": record.holdings().inflight_pulls,
                "step_ms": round(load.step_ms, 2) if load else None,
                "last_report_age_s": round(now - record.last_report_at, 3)
                if record.last_report_at
                else None,
                "gateway_requests": len(sessions.on(instance_id)),
                "block_size": load.block_size if load else None,
                "kv_bytes_received": load.transfers.bytes_received if load else 0,
                # Prompt blocks the gateway's prefix index holds for it, and from what.
                "prefix_blocks": ctx.control.prefix.index.blocks(instance_id),
                "prefix_tracking": ctx.control.prefix.index.tracking(instance_id),
            }
        )
    return rows


def create_app(
    settings: GatewaySettings,
    dispatch: DispatchSettings,
    secret: bytes,
    rescheduling: ReschedulingSettings | None = None,
) -> FastAPI:
    metrics = GatewayMetrics()
    control = ControlPlane(settings, secret, make_policy(dispatch))
    upstream = Upstream(
        instance_api_key(secret),
        settings.upstream_connect_timeout_s,
        settings.upstream_stall_timeout_s,
    )
    kv = KVControlClient(secret)
    predictor = TtftPredictor(dispatch.default_prefill_tokens_per_s)
    shedding = SloShedding(settings, predictor, dispatch.slo)
    ctx = GatewayContext(settings, control, upstream, kv, metrics, shedding)
    sessions = SessionRegistry()
    migrator = Migrator(
        ctx, sessions, rescheduling or ReschedulingSettings(), watermark=dispatch.watermark
    )

    def fail_over(instance_id: str) -> None:
        for session in sessions.on(instance_id):
            session.interrupt(Cut("failover"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await upstream.start()
        await control.start()
        metrics.watch(control)
        control.on_instance_down(fail_over)
        migrator.start_loop()
        preloading = asyncio.ensure_future(ctx.preload_tokenizers())
        try:
            yield
        finally:
            preloading.cancel()
            await migrator.stop()
            await control.stop()
            await upstream.close()
            kv.close()
            ctx.tokens.close()

    app = FastAPI(title="pdserve gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    app.state.sessions = sessions

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return APIError(400, str(error.errors()[:1])).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("pdserve: unexpected error on %s", request.url.path)
        return APIError(500, "internal error in the gateway").response()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _serve("chat", request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve("completion", request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The models a request can be served with now: some usable instance, of any role,
        serves each (while none is usable, the list is empty and ``/health`` is 503)."""
        served = ctx.control.usable_models()
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "pdserve",
                    "max_model_len": max_len,
                }
                for name, max_len in served.items()
            ],
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while some instance is usable (of any role: roles are preferences), with how
        requests are served now and the roles of the usable instances."""
        snapshot = ctx.control.snapshot()
        mode = serving(snapshot)
        usable = snapshot.pool("any")
        return JSONResponse(
            {
                "status": "ok" if mode is not Serving.NONE else "no usable instance",
                "serving": mode.value,
                "roles": {role: sum(v.role == role for v in usable) for role in ROLES},
                "instances": len(ctx.control.instances),
            },
            status_code=503 if mode is Serving.NONE else 200,
        )

    add_utility_routes(app, health)
    add_responses_routes(app)

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.inflight.set(ctx.admission.inflight)
        metrics.queued.set(ctx.admission.queued)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/instances")
    async def admin_instances() -> list[dict[str, Any]]:
        return instance_summary(ctx, sessions)

    @app.post("/admin/instances/{instance_id}/drain")
    async def drain(instance_id: str) -> dict[str, Any]:
        """No new work for the instance, and its running requests move away live."""
        record = _record(ctx, instance_id)
        record.draining = True
        moving = migrator.drain(instance_id)
        return {"id": instance_id, "draining": True, "moving": moving}

    @app.post("/admin/instances/{instance_id}/undrain")
    async def undrain(instance_id: str) -> dict[str, Any]:
        _record(ctx, instance_id).draining = False
        return {"id": instance_id, "draining": False}

    @app.post("/admin/migrate")
    async def migrate(request: Request) -> dict[str, Any]:
        """Moves one request (``{"request_key", "target", "mode"?}``); reports how it went.

        ``mode``: ``live`` (default, pre-copy while decoding), or the baselines ``blocking``
        (stop, copy all, resume) and ``recompute`` (re-prefill on the target).
        """
        body = await _read_body(request)
        if not isinstance(body, dict) or not {"request_key", "target"} <= body.keys():
            raise APIError(400, 'body must be {"request_key": ..., "target": ...}')
        session = sessions.find(str(body["request_key"]))
        if session is None:
            raise APIError(404, "no such request in flight", param="request_key")
        _record(ctx, str(body["target"]))
        mode = body.get("mode", "live")
        if mode not in MIGRATION_MODES:
            raise APIError(400, f"mode must be one of {', '.join(MIGRATION_MODES)}", param="mode")
        result = await migrator.migrate(session, str(body["target"]), mode)
        return result.as_json()

    @app.get("/admin/policy")
    async def policy() -> dict[str, Any]:
        """The dispatch policy's name and, for one that learns (``adaptive``), what it has
        learnt and its latest decisions (``DescribedPolicy.describe``)."""
        chosen = ctx.control.policy
        described = {}
        if isinstance(chosen, DescribedPolicy):
            described = chosen.describe(ctx.control.snapshot())
        return {"policy": dispatch.policy, **described}

    @app.get("/admin/migrations")
    async def migrations() -> dict[str, Any]:
        return {
            "in_flight": sorted(migrator.moving),
            "recent": [r.as_json() for r in migrator.recent],
        }

    @app.get("/admin/requests")
    async def requests_in_flight(recent: int = 0) -> list[dict[str, Any]]:
        """The requests in flight, then up to ``recent`` finished ones, newest first; each
        with its time to first token by phase (``gateway/phases``)."""
        rows = [request_row(s, where) for s, where in sessions.where.items()]
        return rows + list(ctx.recent.latest(recent))

    # Added last = outermost: the size limit applies before anything reads the body.
    app.add_middleware(BearerAuth, api_key=settings.api_key)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app


def _record(ctx: GatewayContext, instance_id: str) -> Any:
    record = ctx.control.record(instance_id)
    if record is None:
        raise APIError(404, f"no instance {instance_id}", param="instance_id")
    return record
