"""One client request, several sequences: batched prompts and ``n > 1``.

vLLM answers ``/v1/completions`` with a list of prompts by one choice per prompt, and
``n > 1`` by n choices per prompt, choice ``i * n + j`` being prompt ``i``'s ``j``-th
sample; with a seed, sample ``j`` is drawn with ``seed + j`` (vLLM's parallel sampling gives
each child request its own seed so). pdserve serves each sequence as its own session (so
each can migrate and fail over alone) and merges their chunks back into one answer.

Prefill happens once per prompt: sample 0 (the leader) is dispatched as usual; samples
1..n-1 wait until the leader's first token, when the prompt's KV is in the leader's decode
instance's prefix cache, and then decode on that same instance from the cached prefix. If
the leader fails before its first token, they are dispatched on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from pdserve.gateway.context import GatewayContext
from pdserve.gateway.openai_api import ChatRequest, CompletionRequest, Kind, Service
from pdserve.gateway.phases import Timeline
from pdserve.gateway.responses import Folder, whole_usage
from pdserve.gateway.session import STARTED, RequestSession, SessionRegistry
from pdserve.gateway.tokens import Counted


@dataclass(frozen=True)
class Sample:
    """One sequence of a client request: the request as a single-prompt, ``n == 1`` one."""

    index: int  # the choice index in the client's answer
    prompt_index: int
    sample: int  # j of n
    request: ChatRequest | CompletionRequest


def split(request: ChatRequest | CompletionRequest) -> list[Sample]:
    """The sequences of a request, in choice order (a plain request: itself, alone)."""
    prompts: Sequence[Any] = [None]
    if isinstance(request, CompletionRequest) and _is_batch(request.prompt):
        prompts = list(request.prompt)
    n = request.n
    if n == 1 and len(prompts) == 1 and prompts[0] is None:
        return [Sample(0, 0, 0, request)]
    out = []
    for i, prompt in enumerate(prompts):
        for j in range(n):
            update: dict[str, Any] = {"n": 1}
            if prompt is not None:
                update["prompt"] = prompt
            if request.seed is not None:
                update["seed"] = request.seed + j
            out.append(Sample(i * n + j, i, j, request.model_copy(update=update)))
    return out


def _is_batch(prompt: Any) -> bool:
    """A list of prompts (strings, or token-id lists), not one prompt of token ids."""
    return isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)


def merge_usage(usages: Sequence[tuple[Sample, dict[str, int]]]) -> dict[str, int]:
    """vLLM's usage for the whole request: each prompt counted once, every sample's output."""
    prompt = sum(u.get("prompt_tokens", 0) for s, u in usages if s.sample == 0)
    completion = sum(u.get("completion_tokens", 0) for _, u in usages)
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }


def reindex(chunk: dict[str, Any], index: int, response_id: str) -> dict[str, Any]:
    """A sub-session's chunk as a chunk of the whole answer."""
    chunk["id"] = response_id
    for choice in chunk.get("choices") or []:
        choice["index"] = index
    return chunk


async def interleave(
    streams: Sequence[AsyncGenerator[dict[str, Any], None]],
) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """Each stream's items as they come, tagged with the stream's position; closing the
    result closes every stream (which aborts their upstream requests)."""
    # Unbounded: a pump never blocks, so cancelling it always ends it (a bounded queue left
    # pumps stuck in their last put once the reader had gone). A request's chunks are
    # bounded by its samples' max_tokens anyway.
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(position: int, stream: AsyncGenerator[dict[str, Any], None]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((position, item))
        except Exception as e:  # handed to the reader, which re-raises it
            queue.put_nowait((position, e))
        finally:
            queue.put_nowait((position, done))

    tasks = [asyncio.ensure_future(pump(p, s)) for p, s in enumerate(streams)]
    running = len(tasks)
    try:
        while running:
            position, item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield position, item
    finally:
        # A cancelled pump throws CancelledError into its stream's pending step, which ends
        # (closes) that generator; a stream whose pump never ran is closed here.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            with contextlib.suppress(RuntimeError):
                await stream.aclose()


def _is_usage_chunk(chunk: dict[str, Any]) -> bool:
    return not chunk.get("choices") and "usage" in chunk and "error" not in chunk


class FanOut:
    """The sessions of one multi-sequence request, seen by the HTTP layer as one session:
    ``generate()`` yields STARTED once every sequence has started (or raises the first
    sequence's error before that), then the sequences' chunks as they come, re-indexed, and
    one usage chunk for all of them at the end when the client asked for usage."""

    def __init__(self, sequences: Sequence[Sample], sessions: Sequence[RequestSession]):
        self.sequences = list(sequences)
        self.sessions = list(sessions)
        leader = self.sessions[0]
        self.kind = leader.kind
        self.request = leader.request
        self.client_stream = leader.client_stream
        self.include_usage = leader.include_usage
        self.response_id = leader.response_id
        self.request_id = leader.request_id
        self.arrived = leader.arrived
        self._usages: list[tuple[Sample, dict[str, int]]] = []

    @property
    def finish_reason(self) -> str | None:
        reasons = [s.finish_reason for s in self.sessions]
        return None if None in reasons else reasons[-1]

    @property
    def last_token_at(self) -> float | None:
        times = [s.last_token_at for s in self.sessions if s.last_token_at is not None]
        return max(times, default=None)

    async def generate(self) -> AsyncGenerator[Any, None]:
        started: set[int] = set()
        held: list[dict[str, Any]] = []
        async for position, item in interleave([s.generate() for s in self.sessions]):
            if item is STARTED:
                started.add(position)
                if len(started) == len(self.sessions):
                    yield STARTED
                    for chunk in held:
                        yield chunk
                    held.clear()
                continue
            if _is_usage_chunk(item):
                self._usages.append((self.sequences[position], item["usage"]))
                continue
            chunk = reindex(item, self.sequences[position].index, self.response_id)
            if len(started) < len(self.sessions):
                held.append(chunk)
            else:
                yield chunk
        if self.include_usage and self.client_stream:
            yield {**self.sessions[0].envelope(streamed=True), "choices": [], "usage": self.usage()}

    def usage(self) -> dict[str, int]:
        if self._usages:
            return merge_usage(self._usages)
        return merge_usage(
            [(q, s.usage()) for q, s in zip(self.sequences, self.sessions, strict=True)]
        )

    def folder(self) -> MultiFolder:
        return MultiFolder(self)


class MultiFolder:
    """The non-streaming answer of a fan-out: each sequence folded alone, then merged."""

    def __init__(self, fan: FanOut) -> None:
        self.fan = fan
        self.folders = {
            q.index: Folder(s) for q, s in zip(fan.sequences, fan.sessions, strict=True)
        }

    def add(self, chunk: dict[str, Any]) -> None:
        for choice in chunk.get("choices") or []:
            self.folders[choice["index"]].add({"choices": [choice]})

    def response(self) -> dict[str, Any]:
        body = self.fan.sessions[0].envelope(streamed=False)
        choices = []
        for index in sorted(self.folders):
            answer = self.folders[index].response()
            for choice in answer["choices"]:
                choice["index"] = index
                choices.append(choice)
        body.update(choices=choices, usage=whole_usage(self.fan.usage()))
        return body


def open_request(
    ctx: GatewayContext,
    registry: SessionRegistry,
    kind: Kind,
    request: ChatRequest | CompletionRequest,
    service: Service,
    request_id: str | None = None,
    counted: Counted | None = None,
    timeline: Timeline | None = None,
) -> RequestSession | FanOut:
    """The session(s) serving a client request: one, or a ``FanOut`` of one per sample, each
    later sample of a prompt following that prompt's first (see the module doc). ``counted``:
    the request's prompts as the gateway counted them; ``timeline``: its arrival."""
    samples = split(request)
    if len(samples) == 1:
        return RequestSession(
            ctx, registry, kind, request, service, None, request_id, counted, timeline
        )
    leaders: dict[int, RequestSession] = {}
    sessions = []
    for sample in samples:
        leader = leaders.get(sample.prompt_index)
        prompt = counted.one(sample.prompt_index) if counted is not None else None
        session = RequestSession(
            ctx, registry, kind, sample.request, service, leader, request_id, prompt, timeline
        )
        leaders.setdefault(sample.prompt_index, session)
        sessions.append(session)
    return FanOut(samples, sessions)


def folder_for(session: RequestSession | FanOut) -> Folder | MultiFolder:
    """What folds the session's chunks into a non-streaming answer."""
    return session.folder() if isinstance(session, FanOut) else Folder(session)
