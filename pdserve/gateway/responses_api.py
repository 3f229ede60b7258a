"""vLLM's Responses API (``/v1/responses``), served whole by one instance.

A response may be stored on its instance and continued later (``previous_response_id``),
fetched (``GET /v1/responses/{id}``) or cancelled; that state lives in the instance that made
it, so the gateway does not split these requests into prefill and decode legs: it sends each
to the least busy usable instance of the model, remembers which instance made which
response, and sends every later request about a response to that instance. Streams are
relayed byte for byte (their events are vLLM's, ``event:`` lines included).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pdserve.gateway.context import GatewayContext
from pdserve.gateway.errors import APIError, from_upstream
from pdserve.gateway.openai_api import parse_json_body
from pdserve.gateway.utility_api import pick_instance
from pdserve.gateway.vllm_fields import refuse_fields

# Responses whose instance the gateway remembers (oldest forgotten first).
MAX_REMEMBERED = 10_000
# A stream's first bytes are read for the response's id, at most this many.
ID_PEEK_BYTES = 4096


class ResponseHomes:
    """Which instance made each response (bounded, least recently used forgotten)."""

    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self.limit = limit
        self._homes: OrderedDict[str, str] = OrderedDict()

    def remember(self, response_id: str, instance_id: str) -> None:
        self._homes[response_id] = instance_id
        self._homes.move_to_end(response_id)
        while len(self._homes) > self.limit:
            self._homes.popitem(last=False)

    def home(self, response_id: str) -> str | None:
        return self._homes.get(response_id)


def _home(ctx: GatewayContext, homes: ResponseHomes, response_id: str) -> tuple[str, str]:
    """The id and URL of the live instance that made ``response_id``; 404 if none."""
    instance_id = homes.home(response_id)
    record = ctx.control.record(instance_id) if instance_id is not None else None
    if instance_id is None or record is None:
        raise APIError(404, f"no response {response_id} on a live instance", param="response_id")
    return instance_id, record.info.url


def _target(ctx: GatewayContext, homes: ResponseHomes, body: dict[str, Any]) -> tuple[str, str]:
    previous = body.get("previous_response_id")
    if isinstance(previous, str):
        return _home(ctx, homes, previous)
    model = body.get("model")
    return pick_instance(ctx, model if isinstance(model, str) else None)


def _learn(homes: ResponseHomes, instance_id: str, answer: Any) -> None:
    if isinstance(answer, dict) and isinstance(answer.get("id"), str):
        homes.remember(answer["id"], instance_id)


_ID = re.compile(rb'"id"\s*:\s*"([^"]{1,256})"')


def _peek_id(head: bytes) -> str | None:
    """The response id in a stream's first event (``response.created``)."""
    found = _ID.search(head)
    return found.group(1).decode(errors="replace") if found else None


async def _relay(
    homes: ResponseHomes, instance_id: str, response: aiohttp.ClientResponse
) -> AsyncIterator[bytes]:
    head = b""
    learned = False
    try:
        async for piece in response.content.iter_any():
            if not learned and len(head) < ID_PEEK_BYTES:
                head += piece
                found = _peek_id(head)
                if found is not None:
                    _learn(homes, instance_id, {"id": found})
                    learned = True
            yield piece
    finally:
        response.close()  # the client left, or the stream ended: vLLM aborts or is done


async def _create(request: Request, homes: ResponseHomes) -> Response:
    ctx: GatewayContext = request.app.state.ctx
    body = parse_json_body(await request.body())
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    refuse_fields(body)
    instance_id, url = _target(ctx, homes, body)
    headers = {k: v for k, v in request.headers.items() if k.lower() == "x-request-id"}
    try:
        response = await ctx.upstream.session.post(
            url + "/v1/responses", json=body, headers=headers
        )
    except aiohttp.ClientError as e:
        raise APIError(502, f"the instance did not answer /v1/responses: {e}") from None
    if response.status != 200 or not body.get("stream"):
        try:
            answer = await response.json(content_type=None)
        except (aiohttp.ClientError, ValueError) as e:
            raise APIError(502, f"the instance's answer was not JSON: {e}") from None
        finally:
            response.close()
        if response.status != 200:
            raise from_upstream(response.status, answer)
        _learn(homes, instance_id, answer)
        return JSONResponse(answer)
    return StreamingResponse(
        _relay(homes, instance_id, response),
        media_type=response.headers.get("content-type", "text/event-stream"),
    )


async def _about(request: Request, homes: ResponseHomes, response_id: str, suffix: str) -> Any:
    ctx: GatewayContext = request.app.state.ctx
    _, home = _home(ctx, homes, response_id)
    url = home + f"/v1/responses/{response_id}{suffix}"
    method = ctx.upstream.session.get if not suffix else ctx.upstream.session.post
    try:
        async with method(url) as response:
            answer = await response.json(content_type=None)
            if response.status != 200:
                raise from_upstream(response.status, answer)
            return answer
    except (aiohttp.ClientError, ValueError) as e:
        raise APIError(502, f"the instance did not answer: {e}") from None


def add_responses_routes(app: FastAPI) -> None:
    """``POST /v1/responses``, ``GET /v1/responses/{id}``, ``POST .../{id}/cancel``."""
    router = APIRouter()
    homes = ResponseHomes()

    @router.post("/v1/responses")
    async def create(request: Request) -> Response:
        return await _create(request, homes)

    @router.get("/v1/responses/{response_id}")
    async def retrieve(request: Request, response_id: str) -> Any:
        return await _about(request, homes, response_id, "")

    @router.post("/v1/responses/{response_id}/cancel")
    async def cancel(request: Request, response_id: str) -> Any:
        return await _about(request, homes, response_id, "/cancel")

    app.include_router(router)
