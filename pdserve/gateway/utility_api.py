"""vLLM's utility endpoints, served by any instance of the model: ``/tokenize``,
``/detokenize``, ``/version`` and ``/ping``.

They hold no KV and are not worth a dispatch decision: the gateway forwards them to the
usable instance of the requested model with the fewest requests, whatever its role (every
instance loads the same tokenizer and chat template), so their answers are exactly vLLM's.
``/ping`` is vLLM's SageMaker health check and answers like ``/health``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from pdserve.gateway.context import GatewayContext
from pdserve.gateway.errors import APIError
from pdserve.gateway.openai_api import parse_json_body
from pdserve.gateway.upstream import UpstreamBroken
from pdserve.gateway.vllm_fields import refuse_fields


def pick_instance(ctx: GatewayContext, model: str | None) -> tuple[str, str]:
    """The id and URL of the usable instance serving ``model`` (any, if None) with the
    fewest requests; 503 when there is none, 404 for a model nobody serves."""
    served = ctx.control.models()
    if model and served and model not in served:
        raise APIError(
            404, f"The model `{model}` does not exist. Served: {', '.join(served)}.", param="model"
        )
    candidates = []
    for view in ctx.control.snapshot().usable():
        record = ctx.control.record(view.instance_id)
        if record is not None and (not model or record.info.model == model):
            candidates.append((view.num_requests, view.instance_id, record.info.url))
    if not candidates:
        raise APIError(503, "no instance is ready to serve", headers={"Retry-After": "2"})
    _, instance_id, url = min(candidates)
    return instance_id, url


def _checked_body(raw: bytes) -> dict[str, Any]:
    body = parse_json_body(raw)
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    refuse_fields(body)
    return body


async def _forward_post(request: Request, path: str) -> dict[str, Any]:
    ctx: GatewayContext = request.app.state.ctx
    body = _checked_body(await request.body())
    model = body.get("model")
    _, url = pick_instance(ctx, model if isinstance(model, str) else None)
    try:
        return await ctx.upstream.post_json(url + path, body)
    except UpstreamBroken as e:
        raise APIError(502, f"the instance did not answer {path}: {e}") from None


def add_utility_routes(app: FastAPI, health: Callable[[], Awaitable[Response]]) -> None:
    """Adds the routes; the app's ``state.ctx`` is the ``GatewayContext`` they use, and
    ``health`` the app's ``/health`` handler, which ``/ping`` answers with."""
    router = APIRouter()

    @router.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        return await _forward_post(request, "/tokenize")

    @router.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        return await _forward_post(request, "/detokenize")

    @router.get("/version")
    async def version(request: Request) -> Any:
        ctx: GatewayContext = request.app.state.ctx
        _, url = pick_instance(ctx, None)
        try:
            return await ctx.upstream.get_json(url + "/version")
        except UpstreamBroken as e:
            raise APIError(502, f"the instance did not answer /version: {e}") from None

    async def ping() -> Response:
        return await health()

    router.add_api_route("/ping", ping, methods=["GET", "POST"])
    app.include_router(router)
