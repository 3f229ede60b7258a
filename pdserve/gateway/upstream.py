"""HTTP calls from the gateway to instances: JSON requests and server-sent event streams.

An instance can fail in two ways the gateway must tell apart: it *answers* with an error (the
request is bad: the client sees it as is), or it *breaks* (connection refused or reset, stream
cut short, stalled): ``UpstreamBroken``, after which the request may continue elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from pdserve.gateway.errors import APIError, from_upstream


class UpstreamBroken(Exception):
    """The instance stopped answering (the request may be retried elsewhere)."""


class Upstream:
    def __init__(self, api_key: str | None, connect_timeout_s: float, stall_timeout_s: float):
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_read=stall_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, headers=self._headers
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() was not awaited"
        return self._session

    async def post_json(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """POSTs and returns the JSON answer; raises APIError or UpstreamBroken."""
        try:
            async with self.session.post(url, json=body) as response:
                payload = await _read_json(response)
                if response.status != 200:
                    raise from_upstream(response.status, payload)
                return payload
        except (aiohttp.ClientError, TimeoutError) as e:
            raise UpstreamBroken(f"{url}: {type(e).__name__}: {e}") from e

    async def get_json(self, url: str) -> Any:
        try:
            async with self.session.get(url) as response:
                return await _read_json(response)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise UpstreamBroken(f"{url}: {type(e).__name__}: {e}") from e

    @asynccontextmanager
    async def stream(self, url: str, body: dict[str, Any]) -> AsyncIterator[UpstreamStream]:
        """Opens an SSE response; APIError if the instance refuses the request.

        Leaving the context closes the connection, which makes vLLM abort the request.
        """
        try:
            response = await self.session.post(url, json=body)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise UpstreamBroken(f"{url}: {type(e).__name__}: {e}") from e
        try:
            if response.status != 200:
                raise from_upstream(response.status, await _read_json(response))
            yield UpstreamStream(response, url)
        finally:
            response.close()


class UpstreamStream:
    """The events of one streamed response; ``abort()`` cuts it from another task.

    Iterating yields each ``data:`` payload decoded, stops at ``[DONE]``, and raises
    UpstreamBroken if the stream breaks, stalls, or ends without ``[DONE]``.
    """

    def __init__(self, response: aiohttp.ClientResponse, url: str) -> None:
        self._response = response
        self.url = url

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return _events(self._response, self.url)

    def abort(self) -> None:
        self._response.close()


async def _read_json(response: aiohttp.ClientResponse) -> Any:
    text = await response.text()
    try:
        return json.loads(text)
    except ValueError:
        return {"error": {"message": text[:500] or f"HTTP {response.status}"}}


async def _events(response: aiohttp.ClientResponse, url: str) -> AsyncIterator[dict[str, Any]]:
    try:
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            try:
                yield json.loads(data)
            except ValueError as e:
                raise UpstreamBroken(f"{url}: undecodable event {data[:100]!r}") from e
    except (aiohttp.ClientError, TimeoutError) as e:
        raise UpstreamBroken(f"{url}: stream broke: {type(e).__name__}: {e}") from e
    raise UpstreamBroken(f"{url}: stream ended without [DONE]")


def check_api_error_event(event: dict[str, Any]) -> APIError | None:
    """vLLM reports errors inside a stream as ``data: {"error": {...}}``."""
    if "error" in event and "choices" not in event:
        error = event["error"]
        status = int(error.get("code") or 500) if isinstance(error, dict) else 500
        return from_upstream(status, event)
    return None
