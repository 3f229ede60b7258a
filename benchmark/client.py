"""Streaming load client: sends the requests on schedule and timestamps every SSE chunk.

Requests go to ``/v1/completions`` with ``stream: true`` and ``stream_options.include_usage``
so the server's own token count arrives in the last chunk; chunk arrival times are taken
with ``time.perf_counter()`` as each line is read, which is what TTFT and ITL are made of
(definitions in ``pdserve.workload.metrics``). A run always ends by itself: after the last request,
or at ``time_limit_s``, when requests still in flight are cancelled and recorded as failed.

A conversation (the ``conversations`` workload) is sent turn by turn: turn k+1 a think time
after turn k's last chunk, its prompt built from turn k's prompt as sent and the answer the
server actually gave (its ``token_ids``, asked for with ``return_token_ids``; its text where
prompts are text), so the prefix it re-sends is exactly what the server computed. A turn that
fails ends its conversation: the turns left are recorded as failed, not sent. The schedule
then gives each conversation's start (``conversation_schedule``); a closed loop keeps that
many conversations going.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from pydantic import BaseModel, Field
from tqdm import tqdm

from pdserve.workload.arrivals import ClosedLoop, OpenLoop, Schedule
from pdserve.workload.conversations import next_prompt
from pdserve.workload.metrics import RequestRecord
from pdserve.workload.workloads import BenchRequest, units

ERROR_TEXT_LIMIT = 500
_log = logging.getLogger(__name__)


class ClientSettings(BaseModel):
    """Where and how requests are sent."""

    url: str = Field(
        "http://127.0.0.1:8000",
        description="base URL of the OpenAI-compatible server (pdserve gateway or vLLM)",
    )
    api_key: str | None = Field(None, description="sent as 'Authorization: Bearer KEY'")
    model: str | None = Field(None, description="model name; default: first of GET /v1/models")
    temperature: float = Field(0.0, ge=0, description="sampling temperature")
    ignore_eos: bool = Field(
        True, description="generate exactly max_tokens tokens (vLLM's ignore_eos)"
    )
    request_timeout_s: float = Field(600.0, gt=0, description="limit on one request")
    # Written out only when off, so that settings saved before it existed read back alike.
    send_priority: bool = Field(
        True,
        description="send a request of the workload's high-priority class with vLLM's "
        "'priority' field (-1: lower is earlier); off: every request is sent alike",
        exclude_if=lambda v: v is True,
    )


@dataclass(frozen=True)
class Target:
    """A resolved endpoint: URL, headers and the request fields common to all requests."""

    completions_url: str
    headers: dict[str, str]
    model: str
    temperature: float
    ignore_eos: bool
    request_timeout_s: float
    send_priority: bool = True

    def payload(self, request: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": request.prompt,
            "max_tokens": request.output_len,
            "temperature": self.temperature,
            "ignore_eos": self.ignore_eos,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.conversation is not None:
            body["return_token_ids"] = True  # the next turn re-sends the answer's ids
        if self.send_priority and request.priority:
            body["priority"] = -request.priority  # the workload's higher is vLLM's lower
        return body


@dataclass
class Outcome:
    """The records of one load point and how long it took."""

    records: list[RequestRecord]
    duration_s: float
    timed_out: bool


def api_base(url: str) -> str:
    """``http://host:port/v1`` whether the user gave it with or without ``/v1``."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def first_model(session: aiohttp.ClientSession, settings: ClientSettings) -> str:
    """The first model the server lists: a single-model server needs no ``--model``."""
    async with session.get(
        api_base(settings.url) + "/models", headers=auth_headers(settings.api_key)
    ) as response:
        response.raise_for_status()
        models = (await response.json())["data"]
    if not models:
        raise RuntimeError(f"{settings.url} lists no model")
    return str(models[0]["id"])


async def resolve_target(settings: ClientSettings) -> Target:
    """Fixes the model name once, so every load point asks for the same model."""
    model = settings.model
    if model is None:
        timeout = aiohttp.ClientTimeout(total=settings.request_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            model = await first_model(session, settings)
    return Target(
        completions_url=api_base(settings.url) + "/completions",
        headers=auth_headers(settings.api_key),
        model=model,
        temperature=settings.temperature,
        ignore_eos=settings.ignore_eos,
        request_timeout_s=settings.request_timeout_s,
        send_priority=settings.send_priority,
    )


def parse_sse_line(line: bytes) -> dict[str, Any] | None:
    """The JSON object of one ``data:`` line; None for blank, comment and ``[DONE]`` lines."""
    text = line.strip().decode("utf-8")
    if not text.startswith("data:"):
        return None
    data = text.removeprefix("data:").strip()
    return None if data == "[DONE]" else json.loads(data)


@dataclass
class StreamState:
    """What the parser remembers between chunks of one stream."""

    chunks: int = 0
    last: float = 0.0
    usage_tokens: int | None = None
    # The answer, for a conversation's next turn.
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: list[str] = dataclasses.field(default_factory=list)


def observe_chunk(
    record: RequestRecord, chunk: dict[str, Any], at: float, state: StreamState
) -> None:
    """Folds one chunk arriving at ``at`` (seconds since send) into the record."""
    if chunk.get("error"):
        record.error = json.dumps(chunk["error"])[:ERROR_TEXT_LIMIT]
    elif choices := chunk.get("choices"):
        if record.ttft_s is None:
            record.ttft_s = at
        else:
            record.itl_s.append(at - state.last)
        state.last = at
        state.chunks += 1
        for choice in choices:
            state.token_ids += choice.get("token_ids") or []
            state.text.append(choice.get("text") or "")
    elif usage := chunk.get("usage"):
        state.usage_tokens = usage.get("completion_tokens")


def finish_record(record: RequestRecord, state: StreamState) -> None:
    """E2E, token count and success once the stream has ended."""
    if record.ttft_s is None:
        record.error = record.error or "stream ended without a token"
        return
    record.e2e_s = state.last
    record.output_tokens = state.usage_tokens if state.usage_tokens is not None else state.chunks
    record.success = not record.error


async def send(
    session: aiohttp.ClientSession, target: Target, request: BenchRequest, record: RequestRecord
) -> StreamState:
    """Streams one completion into ``record`` (returns what the parser kept); never raises,
    except on cancellation."""
    state = StreamState()
    sent = time.perf_counter()
    try:
        async with session.post(
            target.completions_url,
            json=target.payload(request),
            headers=target.headers,
            timeout=aiohttp.ClientTimeout(total=target.request_timeout_s),
        ) as response:
            if response.status != 200:
                body = await response.text()
                record.error = f"HTTP {response.status}: {body[:ERROR_TEXT_LIMIT]}"
                return state
            async for line in response.content:
                at = time.perf_counter() - sent
                chunk = parse_sse_line(line)
                if chunk is not None:
                    observe_chunk(record, chunk, at, state)
        finish_record(record, state)
    except asyncio.CancelledError:
        record.error = "cancelled: the run's time limit was reached"
        raise
    except Exception as error:  # a benchmark records failures; it does not stop on them
        record.error = f"{type(error).__name__}: {error}"[:ERROR_TEXT_LIMIT]
    return state


def follow_up(sent: BenchRequest, state: StreamState, request: BenchRequest) -> BenchRequest:
    """Turn k+1 built on turn k's actual answer; the workload's own prompt (built on a
    sampled answer) only where the server gave no token ids back."""
    if request.user is None:
        return request
    answer: list[int] | str
    if isinstance(sent.prompt, str):
        answer = "".join(state.text)
    elif state.token_ids:
        answer = state.token_ids
    else:
        _log.warning("no token_ids in the answer: the next turn re-sends a sampled answer")
        return request
    prompt = next_prompt(sent.prompt, answer, request.user)
    tokens = request.input_len if isinstance(prompt, str) else len(prompt)
    return dataclasses.replace(request, prompt=prompt, input_len=tokens)


class Runner:
    """Sends one load point's requests on a schedule and collects their records."""

    def __init__(
        self,
        target: Target,
        requests: Sequence[BenchRequest],
        progress: bool = True,
        description: str = "",
    ) -> None:
        self.target = target
        self.requests = requests
        self.records: list[RequestRecord] = []
        self.bar = tqdm(
            total=len(requests),
            desc=description,
            file=sys.stderr,
            disable=not progress,
            unit="req",
            leave=False,
        )
        self.start = 0.0

    def _record(self, index: int, request: BenchRequest) -> RequestRecord:
        record = RequestRecord(
            index=index,
            input_len=request.input_len,
            output_len=request.output_len,
            start_s=time.perf_counter() - self.start,
            priority=request.priority,
        )
        self.records.append(record)
        return record

    async def one(
        self, session: aiohttp.ClientSession, index: int, request: BenchRequest | None = None
    ) -> tuple[RequestRecord, StreamState]:
        request = request or self.requests[index]
        record = self._record(index, request)
        state = await send(session, self.target, request, record)
        self.bar.update()
        return record, state

    async def unit(self, session: aiohttp.ClientSession, indices: Sequence[int]) -> None:
        """One request, or a conversation: each turn after the previous one's answer and
        its think time, built on that answer; a failed turn ends the conversation."""
        previous: tuple[BenchRequest, StreamState] | None = None
        for position, index in enumerate(indices):
            request = self.requests[index]
            if previous is not None:
                await asyncio.sleep(request.think_s)
                request = follow_up(*previous, request)
            record, state = await self.one(session, index, request)
            if not record.success:
                self._not_sent(indices[position + 1 :], request.turn)
                return
            previous = (request, state)

    def _not_sent(self, indices: Sequence[int], turn: int) -> None:
        for index in indices:
            record = self._record(index, self.requests[index])
            record.error = f"not sent: turn {turn} of its conversation failed"
            self.bar.update()

    async def open_loop(self, session: aiohttp.ClientSession, schedule: OpenLoop) -> None:
        """Starts each request (or conversation) at its time, whether or not earlier ones
        have finished."""
        async with asyncio.TaskGroup() as group:
            for unit, at in zip(units(self.requests), schedule.times, strict=False):
                delay = self.start + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                group.create_task(self.unit(session, unit))

    async def closed_loop(self, session: aiohttp.ClientSession, schedule: ClosedLoop) -> None:
        """``concurrency`` workers, each starting the next request (or conversation) when its
        last one ends."""
        pending: Iterator[list[int]] = iter(units(self.requests))

        async def worker() -> None:
            for unit in pending:  # a shared iterator: each unit goes to one worker
                await self.unit(session, unit)

        async with asyncio.TaskGroup() as group:
            for _ in range(schedule.concurrency):
                group.create_task(worker())

    async def run(self, schedule: Schedule, time_limit_s: float) -> Outcome:
        """Runs until every request has ended or ``time_limit_s`` has passed."""
        connector = aiohttp.TCPConnector(limit=0)  # concurrency is the schedule's business
        timed_out = False
        async with aiohttp.ClientSession(connector=connector) as session:
            self.start = time.perf_counter()
            try:
                async with asyncio.timeout(time_limit_s):
                    if isinstance(schedule, OpenLoop):
                        await self.open_loop(session, schedule)
                    else:
                        await self.closed_loop(session, schedule)
            except TimeoutError:
                timed_out = True
            duration = time.perf_counter() - self.start
        self.bar.close()
        self.records.sort(key=lambda r: r.index)
        return Outcome(self.records, duration, timed_out)


async def drive(
    target: Target,
    requests: Sequence[BenchRequest],
    schedule: Schedule,
    time_limit_s: float,
    progress: bool = True,
    description: str = "",
) -> Outcome:
    """One load point: the requests sent on ``schedule``, bounded by ``time_limit_s``."""
    return await Runner(target, requests, progress, description).run(schedule, time_limit_s)
