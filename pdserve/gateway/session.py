"""One client request, from placement to its last token, across as many instances as needed.

A session runs *legs*. The first leg is either a whole request on one instance, or a
disaggregated one: a prefill leg on a prefill instance (non-streaming, one token, exporting
its KV) followed by a decode leg that pulls that KV. Every leg streams from the instance with
token ids, so the gateway always knows the prompt's token ids and every token generated so
far. That is what lets a request continue elsewhere without a restart:

- *failover*: the instance broke, so the next leg re-prefills prompt + output on a survivor;
- *migration*: the gateway cut the stream on purpose, and the next leg pulls the KV of
  prompt + output from the instance it left (see ``pdserve.gateway.migration``).

A continuation leg sends ``prompt + output`` as token ids (``/v1/completions``: as the prompt;
chat: as ``kv_transfer_params.prompt_token_ids``, which vLLM uses instead of templating), with
the remaining token budget, so the client's stream goes on in its own format.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from pdserve.gateway.context import GatewayContext
from pdserve.gateway.cut import Cut
from pdserve.gateway.errors import APIError
from pdserve.gateway.metrics import Refusal, dispatch_mode
from pdserve.gateway.openai_api import (
    ENDPOINTS,
    GATEWAY_FIELDS,
    ChatRequest,
    CompletionRequest,
    Kind,
    Service,
)
from pdserve.gateway.phases import Timeline, observe
from pdserve.gateway.prompt_extras import PromptExtras
from pdserve.gateway.tokens import Counted, estimate_for
from pdserve.gateway.upstream import (
    UpstreamBroken,
    UpstreamStream,
    check_api_error_event,
)
from pdserve.kv.messages import (
    PARAMS_KEY,
    SourceSpec,
    TransferParams,
    params_to_json,
    parse_params,
    tokens_digest,
)
from pdserve.logs import get_logger
from pdserve.scheduler.dispatch import Dispatch, NoInstance
from pdserve.scheduler.snapshot import RequestEstimate

logger = get_logger(__name__)

STARTED: dict[str, Any] = {}  # first item of every session: the request was accepted


# Longest a migration cut waits for the leg's next token before cutting mid-step.
CUT_FALLBACK_S = 0.5


@dataclass
class SessionRegistry:
    """Sessions by the instance currently serving them (for failover, drain, migration)."""

    by_instance: dict[str, set[RequestSession]] = field(default_factory=dict)
    where: dict[RequestSession, str] = field(default_factory=dict)

    def attach(self, session: RequestSession, instance_id: str) -> None:
        self.detach(session)
        self.by_instance.setdefault(instance_id, set()).add(session)
        self.where[session] = instance_id

    def detach(self, session: RequestSession) -> None:
        instance_id = self.where.pop(session, None)
        if instance_id is not None:
            sessions = self.by_instance.get(instance_id)
            if sessions is not None:
                sessions.discard(session)
                if not sessions:
                    del self.by_instance[instance_id]

    def on(self, instance_id: str) -> list[RequestSession]:
        return list(self.by_instance.get(instance_id, ()))

    def find(self, key: str) -> RequestSession | None:
        for session in self.where:
            if session.key == key:
                return session
        return None


class RequestSession:
    def __init__(
        self,
        ctx: GatewayContext,
        registry: SessionRegistry,
        kind: Kind,
        request: ChatRequest | CompletionRequest,
        service: Service | None = None,
        follow: RequestSession | None = None,
        request_id: str | None = None,
        prompt: Counted | None = None,
        timeline: Timeline | None = None,
    ) -> None:
        """``follow``: another sample of the same prompt (``fanout``); this one decodes where
        that one did, from the prompt's KV in that instance's prefix cache. ``request_id``: the
        client's ``X-Request-Id``: the base of the response's id and the id every leg carries
        (vLLM logs it), as in plain vLLM. ``prompt``: its tokens as the gateway counted them
        (``gateway.tokens``: trusted ids replace the prompt on every leg); ``timeline``: the
        request's arrival and tokenization (``gateway.phases``)."""
        self.ctx = ctx
        self.registry = registry
        self.kind = kind
        self.request = request
        self.service = service if service is not None else Service(request.priority)
        self.key = uuid.uuid4().hex
        self.follow = follow
        # Set at this session's first token (``first_token_on``: where), or when it ends.
        self.first_token = asyncio.Event()
        self.first_token_on: str | None = None
        self.response_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + (request_id or self.key)
        self.request_id = request_id or self.key
        self.upstream_headers = {"X-Request-Id": self.request_id}
        self.created = int(time.time())
        self.model = request.model or ctx.default_model()
        self.client_stream = request.stream
        options = request.stream_options
        self.include_usage = bool(options and options.include_usage) or not request.stream
        self.base_body = self._base_body(request)
        self.extras = PromptExtras(kind, request, self.client_stream)
        self.budget = request.budget()
        self.prompt = prompt
        self.estimate = estimate_for(request, self.service, prompt)
        ids = prompt.ids() if prompt is not None and prompt.send_ids else None
        self.sends_ids = ids is not None
        self.prompt_ids: list[int] | None = list(ids) if ids is not None else None
        self.output_ids: list[int] = []
        self.output_text = ""
        self.finish_reason: str | None = None
        self.instance_id: str | None = None
        self.legs = 0
        self.failovers = 0
        self.timeline = Timeline.starting(timeline)
        self.arrived = self.timeline.arrived
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._stream: UpstreamStream | None = None
        self._cut: Cut | None = None
        self._migration: Cut | None = None
        # A migration cut waits for the next token of the leg (see ``interrupt``); this
        # cuts anyway if none comes in time.
        self._cut_fallback: asyncio.TimerHandle | None = None

    # --- bodies ----------------------------------------------------------------------------

    def _base_body(self, request: ChatRequest | CompletionRequest) -> dict[str, Any]:
        body = request.model_dump(exclude_unset=True, exclude=set(GATEWAY_FIELDS))
        body["model"] = self.model
        if self.service.vllm_priority or "priority" in body:
            body["priority"] = self.service.vllm_priority  # a header's wins over the body's
        if isinstance(request, CompletionRequest):
            body["max_tokens"] = request.budget()
            if isinstance(request.prompt, list) and isinstance(request.prompt[0], str):
                body["prompt"] = request.prompt[0]
        return body

    def _prefill_body(self, transfer_id: str) -> dict[str, Any]:
        body = {
            k: v
            for k, v in self.base_body.items()
            if k
            not in (
                "max_completion_tokens",
                "min_tokens",
                "logprobs",
                "top_logprobs",
                "echo",
                "stop",
            )
        }
        body.update(max_tokens=1, stream=False, return_token_ids=True)
        params = TransferParams(export={"transfer_id": transfer_id}, request_key=self.key)  # type: ignore[arg-type]
        body["kv_transfer_params"] = params_to_json(params)
        if self.sends_ids and self.prompt_ids is not None:
            self._put_ids(body, body["kv_transfer_params"], self.prompt_ids)
        return body

    def _put_ids(self, body: dict[str, Any], kv: dict[str, Any], ids: list[int]) -> None:
        """Token ids instead of the prompt (chat: ids vLLM uses instead of templating)."""
        if self.kind == "chat":
            kv["prompt_token_ids"] = ids
        else:
            body["prompt"] = ids

    def _leg_body(self, source: SourceSpec | None) -> dict[str, Any]:
        body = copy.deepcopy(self.base_body)
        body.update(stream=True, stream_options={"include_usage": True}, return_token_ids=True)
        self.extras.strip(body)
        kv = params_to_json(TransferParams(source=source, request_key=self.key))
        continuing = bool(self.output_ids)
        if self.prompt_ids is not None and (continuing or source is not None or self.sends_ids):
            self._put_ids(body, kv, self.prompt_ids + self.output_ids)
        if continuing:
            body.pop("echo", None)
            generated = len(self.output_ids)
            if self.budget is not None:
                body["max_tokens"] = max(1, self.budget - generated)
                body.pop("max_completion_tokens", None)
            if body.get("min_tokens"):
                body["min_tokens"] = max(0, body["min_tokens"] - generated)
        body["kv_transfer_params"] = kv
        return body

    # --- the run ---------------------------------------------------------------------------

    async def generate(self) -> AsyncGenerator[dict[str, Any], None]:
        """Yields STARTED, then client-format chunks; raises APIError before STARTED."""
        estimate = self.estimate
        try:
            choice, held_s = (
                await self._follow_leader()
                or await self.ctx.control.dispatch_with_room(
                    estimate, self.key, self.ctx.settings.admission_wait_s
                )
            )
        except NoInstance as e:
            self.ctx.metrics.refused.labels(Refusal.NO_INSTANCE).inc()
            raise APIError(503, f"{e}; try again later", headers={"Retry-After": "1"}) from None
        if held_s > 0:
            self.ctx.metrics.held_for_room_seconds.observe(held_s)
        target, source = choice.decode, None
        record = self.ctx.control.record(choice.decode)
        mode = dispatch_mode(choice, record.info.role if record is not None else None)
        self.ctx.metrics.dispatches.labels(mode).inc()
        logger.debug(
            "pdserve: request %s: prefill on %s, decode on %s",
            self.key,
            choice.prefill or choice.decode,
            choice.decode,
        )
        started = False
        try:
            if choice.prefill is not None:
                source = await self._prefill(choice.prefill)
                target, source = self._decode_target(target, choice.prefill, source, estimate)
            self.ctx.control.decode_started(self.key, target)
            if self.extras.active:
                url = self.ctx.control.url(target)
                await self.extras.prepare(self.ctx, url, self.base_body, self.upstream_headers)
            while True:
                async for chunk in self._leg(target, source):
                    if not started:
                        started = True
                        yield STARTED
                    yield chunk
                if self.finish_reason is not None:
                    break
                target, source = await self._next_leg()
                catch_up = await self._catch_up(target)
                if catch_up is not None:
                    yield catch_up
            if not started:
                started = True
                yield STARTED
            if self.include_usage and self.client_stream:
                yield self._usage_chunk()
        except APIError as e:
            if not started:
                raise
            yield {"error": e.body()["error"]}
        except _Abandon as e:
            error = APIError(503, f"request could not be completed: {e}")
            if not started:
                raise error from None
            yield {"error": error.body()["error"]}
        finally:
            if self.prompt is not None:
                self.prompt.confirm(self.prompt_ids)  # the instance's ids, unless ours went
            self.ctx.recent.add(self)
            self.first_token.set()  # a follower waits no more
            self.ctx.control.forget_held(self.key)
            self.registry.detach(self)
            self._drop_untaken_cut()
            if self._migration is not None:
                self._migration.finish("the request ended before its new instance answered")

    async def _follow_leader(self) -> tuple[Dispatch, float] | None:
        """Where the leader sample decodes, once it has its first token (its prompt's KV is
        in that instance's prefix cache then); None if it has none, or that instance left."""
        if self.follow is None:
            return None
        await self.follow.first_token.wait()
        target = self.follow.first_token_on
        view = self.ctx.control.snapshot().get(target) if target is not None else None
        if view is None or not view.usable:
            return None
        choice = Dispatch(decode=view.instance_id)
        # The prompt's blocks are the leader's (prefix cache): only the output is new.
        self.ctx.control.place(choice, dataclasses.replace(self.estimate, prompt_tokens=0))
        return choice, 0.0

    async def _prefill(self, prefill: str) -> SourceSpec | None:
        """Runs the prefill leg; None if the decode instance should prefill after all."""
        transfer_id = uuid.uuid4().hex
        url = self.ctx.control.url(prefill) + ENDPOINTS[self.kind]
        started = time.perf_counter()
        self.timeline.prefill_sent()
        try:
            answer = await self.ctx.upstream.post_json(
                url, self._prefill_body(transfer_id), self.upstream_headers
            )
        except UpstreamBroken as e:
            logger.warning("pdserve: prefill on %s failed (%s); prefilling on decode", prefill, e)
            self.ctx.control.mark_broken(prefill)
            return None
        except asyncio.CancelledError:
            # The client left mid-prefill: if the prefill finished meanwhile, free its KV.
            self._release_unknown(prefill, transfer_id)
            raise
        elapsed = time.perf_counter() - started
        self.ctx.metrics.prefill_seconds.observe(elapsed)
        logger.debug(
            "pdserve: request %s: prefill leg on %s took %.2f s", self.key, prefill, elapsed
        )
        params = parse_params(answer.get("kv_transfer_params"))
        if params is None or params.source is None:
            logger.warning("pdserve: prefill on %s exported no KV; prefilling on decode", prefill)
            return None
        self.prompt_ids = _prompt_ids(answer)
        self.extras.capture(answer)
        self.timeline.prefill_done()
        return params.source

    def _decode_target(
        self, target: str, prefill: str, source: SourceSpec | None, estimate: RequestEstimate
    ) -> tuple[str, SourceSpec | None]:
        """Where the decode leg goes: the decode instance may have left during the prefill.

        Then another decode-capable instance pulls the prefill's KV (the prefill instance
        itself, if it can decode, computes it again from its prefix cache), and the export is
        released when nobody will pull it, instead of being held for its whole lease.
        """
        view = self.ctx.control.snapshot().get(target)
        if view is not None and view.usable and view.can_decode:
            return target, source
        try:
            chosen = self.ctx.control.dispatch_decode(estimate, prefilled=source is not None)
        except NoInstance as e:
            self._release(source)
            raise APIError(503, f"{e}; try again later", headers={"Retry-After": "1"}) from None
        logger.warning(
            "pdserve: request %s: decode instance %s went away during the prefill; decoding on %s",
            self.key,
            target,
            chosen,
        )
        if source is not None and chosen == prefill:
            self._release(source)
            source = None
        return chosen, source

    def _release_unknown(self, instance_id: str, transfer_id: str) -> None:
        record = self.ctx.control.record(instance_id)
        if record is not None:
            self.ctx.kv.release(record.info.kv_addresses, transfer_id)

    async def _leg(
        self, target: str, source: SourceSpec | None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Streams one leg; ends quietly when the stream was cut (``self._cut`` says why)."""
        self.legs += 1
        self.instance_id = target
        self._cut = None
        record = self.ctx.control.record(target)
        if record is None:
            # It left between its choice and this leg (a migration target, say): fail over.
            logger.warning("pdserve: %s left before request %s reached it", target, self.key)
            self._release(source)
            self._cut = Cut("failover")
            return
        url = record.info.url + ENDPOINTS[self.kind]
        body = self._leg_body(source)
        self.timeline.leg_sent(record.load, pulled=source is not None)
        self.registry.attach(self, target)
        released = source is None
        try:
            async with self.ctx.upstream.stream(url, body, self.upstream_headers) as stream:
                self._stream = stream
                async for event in stream:
                    error = check_api_error_event(event)
                    if error is not None:
                        raise self._explain(error, source)
                    if not released:
                        # The decode instance produced output, so it dealt with the export
                        # (pulled it, or released what it could not use): a Release now
                        # would only leave a tombstone on the exporter for every request.
                        released = True
                    had_tokens = len(self.output_ids)
                    chunk = self._absorb(event)
                    if chunk is not None:
                        yield chunk
                    if self._cut_due(had_tokens):
                        break  # closing the stream aborts the request on the instance
        except UpstreamBroken as e:
            if self.finish_reason is None and self._cut is None:
                logger.warning("pdserve: %s broke during request %s: %s", target, self.key, e)
                self.ctx.control.mark_broken(target)
                self._cut = Cut("failover")
        finally:
            self._stream = None
            self._cancel_cut_fallback()
            if not released:
                self._release(source)

    def _release(self, source: SourceSpec | None) -> bool:
        """Frees an export nobody will pull (the leg ended before any output)."""
        if source is not None:
            self.ctx.kv.release(source.addresses, source.transfer_id)
        return True

    def _explain(self, error: APIError, source: SourceSpec | None) -> APIError:
        if source is not None and not self.output_ids and error.status >= 500:
            return APIError(
                502,
                f"the KV transfer from {source.instance_id} to {self.instance_id} failed and "
                "the decode instance is set to fail such requests (--on-kv-failure fail)",
            )
        return error

    async def _next_leg(self) -> tuple[str, SourceSpec | None]:
        """Where the request goes on after its stream was cut."""
        cut = self._cut or Cut("failover")
        if cut.reason == "migration" and cut.target is not None:
            self._migration = cut
            cut.taken = True
            self._cut = None  # taken: a failover from now on no longer overtakes it
            cut.last_token_at = self.last_token_at
            return cut.target, self._migration_source(cut)
        migration = self._migration
        if migration is not None and not migration.done.is_set():
            # The migration's new leg broke: it failed, whatever the next leg does.
            migration.finish(f"the new leg on {self.instance_id} failed; the request failed over")
        self.failovers += 1
        if self.failovers > self.ctx.settings.max_failovers:
            raise _Abandon(f"instance {self.instance_id} failed {self.failovers} times")
        self.ctx.metrics.failovers.inc()
        tokens = len(self.prompt_ids) if self.prompt_ids else self.estimate.prompt_tokens
        estimate = dataclasses.replace(self.estimate, prompt_tokens=tokens + len(self.output_ids))
        try:
            # No wait for room: the request is already streaming, so it goes on at once.
            choice, _ = await self.ctx.control.dispatch_with_room(estimate, None, 0.0)
        except NoInstance as e:
            raise _Abandon(str(e)) from None
        logger.info(
            "pdserve: request %s continues on %s after %d tokens",
            self.key,
            choice.decode,
            len(self.output_ids),
        )
        return choice.decode, None

    def _migration_source(self, cut: Cut) -> SourceSpec | None:
        """The KV the target pulls: positions with KV on the instance left (all but the last)."""
        if cut.export is None or cut.transfer_id is None or self.prompt_ids is None:
            return None
        tokens = self.prompt_ids + self.output_ids
        covered = len(tokens) - 1
        return SourceSpec(
            transfer_id=cut.transfer_id,
            instance_id=cut.export.instance_id,
            addresses=cut.export.addresses,
            num_tokens=covered,
            block_size=cut.export.block_size,
            cache_fingerprint=cut.export.cache_fingerprint,
            tokens_digest=tokens_digest(tokens[:covered]),
        )

    async def _catch_up(self, target: str) -> dict[str, Any] | None:
        """Text the instance left held back (stop-string lookahead), emitted before going on.

        With stop strings vLLM delays text until it is sure no stop string starts in it; the
        token ids arrive at once. A continuation treats those tokens as prompt and never
        prints them, so the gateway detokenizes the output and sends what is missing.
        """
        if not self.request.stop or not self.output_ids:
            return None
        record = self.ctx.control.record(target)
        if record is None:
            return None
        url = record.info.url + "/detokenize"
        try:
            answer = await self.ctx.upstream.post_json(
                url, {"model": self.model, "tokens": self.output_ids}
            )
        except (APIError, UpstreamBroken):
            return None
        text = str(answer.get("prompt", ""))
        if not text.startswith(self.output_text) or len(text) == len(self.output_text):
            return None
        missing = text[len(self.output_text) :]
        self.output_text = text
        choice: dict[str, Any] = {"index": 0, "finish_reason": None, "logprobs": None}
        if self.kind == "chat":
            choice["delta"] = {"content": missing}
        else:
            choice["text"] = missing
        return self._client_chunk({}, choice)

    # --- events ----------------------------------------------------------------------------

    def _absorb(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """Updates the session from one upstream event; returns the client's chunk, if any."""
        if self.prompt_ids is None:
            self.prompt_ids = _prompt_ids(event)
        choices = event.get("choices") or []
        if not choices:
            return None  # the instance's usage chunk: the gateway reports its own
        choice = choices[0]
        token_ids = choice.get("token_ids") or []
        if token_ids:
            now = time.perf_counter()
            if self.first_token_at is None:
                self.first_token_at = now
                self.timeline.first_token()
                if self.follow is None:  # a follower's queue is its leader's prefill
                    observe(self.ctx.metrics.phase_seconds, self.timeline)
                self.first_token_on = self.instance_id
                self.first_token.set()
                self.ctx.metrics.ttft_seconds.observe(now - self.arrived)
                logger.debug(
                    "pdserve: request %s: first token from %s after %.2f s",
                    self.key,
                    self.instance_id,
                    now - self.arrived,
                )
            elif self.last_token_at is not None:
                self.ctx.metrics.itl_seconds.observe(now - self.last_token_at)
            self.last_token_at = now
            self.output_ids.extend(token_ids)
            migration = self._migration
            if migration is not None and not migration.done.is_set():
                gap = now - (migration.last_token_at or now)
                migration.downtime_s = gap
                self.ctx.metrics.migration_downtime_seconds.observe(gap)
                migration.finish()
        text = _text_of(self.kind, choice)
        self.output_text += text
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        if self.legs > 1 and not token_ids and not text and choice.get("finish_reason") is None:
            return None  # a continuation's role chunk: the client has had one
        return self._client_chunk(event, choice)

    def envelope(self, streamed: bool) -> dict[str, Any]:
        """The fields every response to the client carries, a chunk's or the whole answer's."""
        kinds = {
            (True, True): "chat.completion.chunk",
            (True, False): "chat.completion",
            (False, True): "text_completion",
            (False, False): "text_completion",
        }
        return {
            "id": self.response_id,
            "object": kinds[(self.kind == "chat", streamed)],
            "created": self.created,
            "model": self.model,
        }

    def _client_chunk(self, event: dict[str, Any], choice: dict[str, Any]) -> dict[str, Any]:
        out_choice = dict(choice)
        out_choice["index"] = 0
        self.extras.decorate(out_choice)
        chunk = self.envelope(streamed=True)
        chunk["choices"] = [out_choice]
        if not self.request.return_token_ids:
            out_choice.pop("token_ids", None)
            out_choice.pop("prompt_token_ids", None)
        elif self.kind == "chat" and event.get("prompt_token_ids") is not None and self.legs == 1:
            chunk["prompt_token_ids"] = event["prompt_token_ids"]
        return chunk

    def _usage_chunk(self) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage(),
        }

    def usage(self) -> dict[str, int]:
        prompt = len(self.prompt_ids) if self.prompt_ids is not None else 0
        completion = len(self.output_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    # --- control from outside --------------------------------------------------------------

    def interrupt(self, cut: Cut) -> bool:
        """Cuts the current leg (failover, migration); the session continues per ``cut``.

        A failover overtakes a migration cut whose new leg has not started (its pin is on the
        instance that failed): the migration is told so, and the request fails over instead.
        A migration planned against an earlier leg is refused (its pin is stale).
        """
        pending = self._cut
        if cut.reason == "failover" and pending is not None and pending.reason == "migration":
            self._cut = cut
            self._cancel_cut_fallback()
            if self._stream is not None:
                self._stream.abort()  # the migration cut may still be waiting for a token
            pending.failed_over = True
            pending.finish(f"the request failed over from {self.instance_id} during the move")
            return True
        if cut.leg is not None and cut.leg != self.legs:
            return False
        if self._stream is None or self.finish_reason is not None or self._cut is not None:
            return False
        self._cut = cut
        if cut.reason == "migration":
            # Cut right after the next token: the pause the client sees then starts at a
            # token, not somewhere inside the source's step (up to one step more).
            stream = self._stream
            self._cut_fallback = asyncio.get_running_loop().call_later(CUT_FALLBACK_S, stream.abort)
        else:
            self._stream.abort()
        return True

    def _cut_due(self, tokens_before: int) -> bool:
        """A migration cut is pending and the event just absorbed carried tokens."""
        cut = self._cut
        return (
            cut is not None
            and cut.reason == "migration"
            and self.finish_reason is None
            and len(self.output_ids) > tokens_before
        )

    def _cancel_cut_fallback(self) -> None:
        if self._cut_fallback is not None:
            self._cut_fallback.cancel()
            self._cut_fallback = None

    def _drop_untaken_cut(self) -> None:
        """The request ended with a migration cut pending: the move is off, and the live
        export on the instance left is released now (no leg will pull it)."""
        cut = self._cut
        if cut is None or cut.reason != "migration":
            return
        self._cut = None
        if cut.export is not None and cut.transfer_id is not None:
            self.ctx.kv.release(cut.export.addresses, cut.transfer_id)
        cut.finish("the request finished before the cut")


class _Abandon(Exception):
    """The request cannot go on anywhere."""


def _prompt_ids(event: dict[str, Any]) -> list[int] | None:
    ids = event.get("prompt_token_ids")
    if ids is None:
        choices = event.get("choices") or []
        if choices:
            ids = choices[0].get("prompt_token_ids")
    return list(ids) if ids is not None else None


def _text_of(kind: Kind, choice: dict[str, Any]) -> str:
    if kind == "completion":
        return choice.get("text") or ""
    delta = choice.get("delta") or choice.get("message") or {}
    return delta.get("content") or ""


__all__ = ["PARAMS_KEY", "STARTED", "Cut", "RequestSession", "SessionRegistry"]
