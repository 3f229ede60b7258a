"""HTTP calls from the gateway to instances: JSON requests and server-sent event streams.

An instance can fail in two ways the gateway must tell apart: it *answers* with an error (the
request is bad: the client sees it as is), or it *breaks* (connection refused or reset, stream
cut short, stalled): ``UpstreamBroken``, after which the request may continue elsewhere.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from pdserve.gateway.errors import APIError, from_upstream

# The largest server-sent event accepted from an instance. Every leg asks for token ids, so
# one event carries all prompt token ids: about 7 bytes a token, 64 MiB is ~9M tokens.
MAX_EVENT_BYTES = 64 * 1024 * 1024
# What reading errors look like besides aiohttp.ClientError: aiohttp's LineTooLong and
# "Chunk too big" are ValueErrors, a cut chunked body can surface as IncompleteReadError.
_READ_ERRORS = (aiohttp.ClientError, TimeoutError, ValueError, asyncio.IncompleteReadError)


class UpstreamBroken(Exception):
    """The instance stopped answering (the request may be retried elsewhere)."""


class EventTooLarge(APIError):
    """An instance sent one event larger than ``MAX_EVENT_BYTES`` (another would too)."""

    def __init__(self, url: str, limit: int) -> None:
        super().__init__(
            502, f"an event from the instance at {url} exceeds the gateway's {limit}-byte limit"
        )


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

    async def post_json(
        self, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """POSTs and returns the JSON answer; raises APIError or UpstreamBroken."""
        try:
            async with self.session.post(url, json=body, headers=headers) as response:
                payload = await _read_json(response)
                if response.status != 200:
                    raise from_upstream(response.status, payload)
        except _READ_ERRORS as e:
            raise UpstreamBroken(f"{url}: {type(e).__name__}: {e}") from e
        if not isinstance(payload, dict):
            # A 200 that is not an answer: an instance in a bad state, not a bad request.
            raise UpstreamBroken(f"{url}: unexpected answer {str(payload)[:100]!r}")
        return payload

    async def get_json(self, url: str) -> Any:
        try:
            async with self.session.get(url) as response:
                return await _read_json(response)
        except _READ_ERRORS as e:
            raise UpstreamBroken(f"{url}: {type(e).__name__}: {e}") from e

    @asynccontextmanager
    async def stream(
        self, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> AsyncIterator[UpstreamStream]:
        """Opens an SSE response; APIError if the instance refuses the request.

        Leaving the context closes the connection, which makes vLLM abort the request.
        """
        try:
            response = await self.session.post(url, json=body, headers=headers)
        except _READ_ERRORS as e:
            raise UpstreamBroken(f"{url}: {type(e).__name__}: {e}") from e
        try:
            if response.status != 200:
                try:
                    payload = await _read_json(response)
                except _READ_ERRORS as e:
                    raise UpstreamBroken(f"{url}: {type(e).__name__}: {e}") from e
                raise from_upstream(response.status, payload)
            yield UpstreamStream(response, url)
        finally:
            response.close()


class UpstreamStream:
    """The events of one streamed response; ``abort()`` cuts it from another task.

    Iterating yields each ``data:`` payload decoded, stops at ``[DONE]``, and raises
    UpstreamBroken if the stream breaks, stalls, or ends without ``[DONE]`` (EventTooLarge
    for an event over ``MAX_EVENT_BYTES``).
    """

    def __init__(self, response: aiohttp.ClientResponse, url: str) -> None:
        self._response = response
        self.url = url

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return _events(self._response, self.url, MAX_EVENT_BYTES)

    def abort(self) -> None:
        self._response.close()


async def _read_json(response: aiohttp.ClientResponse) -> Any:
    text = (await response.read()).decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return {"error": {"message": text[:500] or f"HTTP {response.status}"}}


def _split_event(buffer: bytearray) -> bytes | None:
    """Takes the first complete event (up to a blank line) off ``buffer``, if there is one."""
    lf = buffer.find(b"\n\n")
    crlf = buffer.find(b"\r\n\r\n")
    if crlf != -1 and (lf == -1 or crlf < lf):
        event, buffer[: crlf + 4] = bytes(buffer[:crlf]), b""
        return event
    if lf != -1:
        event, buffer[: lf + 2] = bytes(buffer[:lf]), b""
        return event
    return None


def _event_data(event: bytes) -> bytes | None:
    """The ``data:`` field of one SSE event (its lines joined), None if it has none."""
    lines = [line.rstrip(b"\r") for line in event.split(b"\n")]
    data = [line[5:].strip() for line in lines if line.startswith(b"data:")]
    return b"\n".join(data) if data else None


async def _events(
    response: aiohttp.ClientResponse, url: str, max_event_bytes: int
) -> AsyncIterator[dict[str, Any]]:
    """Reads chunks and splits them into events itself: aiohttp's line reader has a limit
    (~128 KiB) that the first event of a long prompt, carrying every prompt token id, passes.
    """
    buffer = bytearray()
    try:
        while True:
            chunk = await response.content.readany()
            if not chunk:
                break
            buffer += chunk
            while (event := _split_event(buffer)) is not None:
                if len(event) > max_event_bytes:
                    raise EventTooLarge(url, max_event_bytes)
                data = _event_data(event)
                if data is None:
                    continue
                if data == b"[DONE]":
                    return
                try:
                    payload = json.loads(data)
                except ValueError:
                    payload = None
                if not isinstance(payload, dict):
                    raise UpstreamBroken(f"{url}: undecodable event {data[:100]!r}")
                yield payload
            if len(buffer) > max_event_bytes:
                raise EventTooLarge(url, max_event_bytes)
    except _READ_ERRORS as e:
        raise UpstreamBroken(f"{url}: stream broke: {type(e).__name__}: {e}") from e
    raise UpstreamBroken(f"{url}: stream ended without [DONE]")


def check_api_error_event(event: dict[str, Any]) -> APIError | None:
    """vLLM reports errors inside a stream as ``data: {"error": {...}}``."""
    if "error" in event and "choices" not in event:
        error = event["error"]
        code = error.get("code") if isinstance(error, dict) else None
        status = code if isinstance(code, int) and 400 <= code <= 599 else 500
        return from_upstream(status, event)
    return None
