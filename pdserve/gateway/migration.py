"""Live migration of running requests between decode instances, driven by the gateway.

The gateway holds each client's stream and knows every token generated so far, so it can
move a request while the client keeps reading (Llumnix's multi-stage migration):

1. **Pin**: the source engine exports the running request's KV *live*; blocks can be read as
   they fill, and vLLM keeps them if the request ends.
2. **Pre-copy**: the target runs a one-token request whose prompt is the first full blocks of
   tokens, pulling their KV from the source into its prefix cache, while the source keeps
   decoding. Repeated while enough new blocks have filled (``max_precopy_stages``).
3. **Cut**: the gateway closes the source stream (vLLM aborts the request, the pinned blocks
   stay) and continues on the target with prompt + output as the prompt; the target finds the
   pre-copied blocks in its prefix cache and pulls only the tail. The client sees one stream.

A failure before the cut leaves the request where it was (``Unpin``); after the cut, the
session's own failover takes over. Requests still queued (no KV yet) simply move.

Two other modes exist as baselines for the downtime benchmark: ``blocking`` (no pre-copy:
stop, copy every block, resume) and ``recompute`` (no KV moves: the target prefills prompt +
output again).

Sampling after a move: the target continues with prompt + output so far as its prompt, so
greedy decoding is unchanged. A ``seed`` is passed on as is, so a seeded sampled request
draws a fresh random stream on the target (reproducible from the same migration points, not
equal to the unmigrated run). vLLM's ``presence``/``frequency`` penalties count output tokens
only, so after a move they no longer see the tokens generated before it; the
``repetition_penalty`` covers prompt and output, so it is unchanged.
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pdserve.gateway.context import GatewayContext
from pdserve.gateway.errors import APIError
from pdserve.gateway.session import Cut, RequestSession, SessionRegistry
from pdserve.gateway.upstream import UpstreamBroken
from pdserve.kv.messages import (
    Failed,
    KVFailure,
    Pin,
    Pinned,
    SourceSpec,
    TransferParams,
    Unpin,
    params_to_json,
    tokens_digest,
)
from pdserve.logs import get_logger
from pdserve.scheduler.rescheduling import (
    ReschedulingSettings,
    plan_drain,
    plan_round,
    preempted_since,
)

logger = get_logger(__name__)

CONTROL_TIMEOUT_S = 5.0

# Rounds the rescheduler waits before trying again to move a request whose move failed.
RETRY_AFTER_ROUNDS = 10

MigrationMode = Literal["live", "blocking", "recompute"]
MIGRATION_MODES: tuple[MigrationMode, ...] = ("live", "blocking", "recompute")


class MigrationStatus(enum.StrEnum):
    """How a migration ended (also the ``result`` label of ``pdserve_migrations``)."""

    COMPLETED = "completed"
    ABORTED = "aborted"


class MigrationFailure(enum.StrEnum):
    """Why a migration was aborted; the request goes on where it was unless the cut happened."""

    FINISHED = "finished"  # the request ended before or during the move
    ALREADY_THERE = "already_there"
    TARGET_UNUSABLE = "target_unusable"  # gone, unhealthy, draining, or cannot decode
    NO_CONTROL_ADDRESS = "no_control_address"
    EXPORT_REFUSED = "export_refused"  # the source would not pin the request's KV
    BETWEEN_INSTANCES = "between_instances"  # no live leg to cut
    CONTINUATION_FAILED = "continuation_failed"  # the target's leg failed after the cut
    FAILED_OVER = "failed_over"  # a failover moved the request first: the pin was stale
    UPSTREAM_ERROR = "upstream_error"
    TIMED_OUT = "timed_out"


@dataclass
class MigrationResult:
    request_key: str
    source: str
    target: str
    status: MigrationStatus
    failure: MigrationFailure | None = None
    reason: str = ""
    mode: MigrationMode = "live"
    stages: int = 0
    precopied_blocks: int = 0
    downtime_s: float | None = None
    duration_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def precopy_request(
    session: RequestSession, prompt: list[int], source: SourceSpec
) -> dict[str, Any]:
    """The one-token completion that pulls ``prompt``'s full blocks into the target's cache."""
    body: dict[str, Any] = {
        "model": session.model,
        "prompt": prompt,
        "max_tokens": 1,
        "temperature": 0,
        "kv_transfer_params": params_to_json(TransferParams(source=source)),
    }
    if "cache_salt" in session.base_body:
        # The salt is part of vLLM's block hashes: without it, a tenant's KV would land in
        # the target's unsalted prefix cache, where any request with the same tokens hits it.
        body["cache_salt"] = session.base_body["cache_salt"]
    return body


def _precopy_safe(session: RequestSession) -> bool:
    """Whether token ids alone reproduce the request's block hashes on the target.

    Pre-copy sends the tokens as a plain completion. Images, audio or video in a chat change
    vLLM's block hashes (their content hashes are mixed in), so the copied blocks would not be
    found, or worse, be found by another request: such requests move without pre-copy (the
    cut pulls all of their KV).
    """
    for message in session.base_body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            isinstance(part, dict) and part.get("type") not in (None, "text") for part in content
        ):
            return False
    return True


class _Abort(Exception):
    def __init__(self, failure: MigrationFailure, detail: str) -> None:
        super().__init__(detail)
        self.failure = failure


class Migrator:
    def __init__(
        self,
        ctx: GatewayContext,
        sessions: SessionRegistry,
        settings: ReschedulingSettings,
        watermark: float,
    ) -> None:
        """``watermark``: the dispatch policy's KV reserve, so moves and placement agree."""
        self.ctx = ctx
        self.sessions = sessions
        self.watermark = watermark
        self.settings = settings
        self.moving: dict[str, asyncio.Task[MigrationResult]] = {}
        self.recent: list[MigrationResult] = []
        self._slots = asyncio.Semaphore(settings.max_migrations)
        self._preemptions: dict[str, int] = {}
        # Requests whose last move failed, and when: the rescheduler leaves them alone a while.
        self._failed_at: dict[str, float] = {}
        self._loop_task: asyncio.Task[None] | None = None

    # --- one migration -----------------------------------------------------------------------

    def start(
        self, session: RequestSession, target: str, mode: MigrationMode = "live"
    ) -> asyncio.Task[MigrationResult]:
        existing = self.moving.get(session.key)
        if existing is not None:
            return existing
        task = asyncio.create_task(self._guarded(session, target, mode))
        self.moving[session.key] = task
        task.add_done_callback(lambda _: self.moving.pop(session.key, None))
        return task

    async def migrate(
        self, session: RequestSession, target: str, mode: MigrationMode = "live"
    ) -> MigrationResult:
        return await self.start(session, target, mode)

    async def _guarded(
        self, session: RequestSession, target: str, mode: MigrationMode
    ) -> MigrationResult:
        async with self._slots:
            result = await self._run(session, target, mode)
        self.ctx.metrics.migrations.labels(result.status).inc()
        self.recent = [*self.recent[-99:], result]
        if result.status is not MigrationStatus.COMPLETED:
            self._failed_at[session.key] = time.monotonic()
        logger.info(
            "pdserve: migration of %s %s -> %s %s%s (downtime %s)",
            result.request_key,
            result.source,
            result.target,
            result.status,
            f": {result.reason}" if result.reason else "",
            f"{result.downtime_s * 1e3:.0f} ms" if result.downtime_s else "-",
        )
        return result

    async def _run(
        self, session: RequestSession, target: str, mode: MigrationMode
    ) -> MigrationResult:
        started = time.perf_counter()
        source = session.instance_id or "?"
        result = MigrationResult(session.key, source, target, MigrationStatus.ABORTED, mode=mode)
        self.ctx.metrics.migrations.labels("started").inc()
        pinned: Pinned | None = None
        pin_sent = False
        transfer_id = uuid.uuid4().hex
        # The leg this move is planned against: a failover starts another one, after which
        # the pin on the instance left must not be cut to (the session refuses such a cut).
        leg, failovers = session.legs, session.failovers
        try:
            self._check_movable(session, target)
            # One deadline for the whole move: pin, every pre-copy stage and the cut share it,
            # so a slow target cannot hold a migration slot for stages x the HTTP timeout.
            deadline = asyncio.get_running_loop().time() + self.settings.migration_timeout_s
            async with asyncio.timeout_at(deadline):
                if mode != "recompute" and session.output_ids and session.prompt_ids is not None:
                    pin_sent = True
                    pinned = await self._pin(session, source, transfer_id)
                if pinned is not None and mode == "live" and _precopy_safe(session):
                    await self._precopy(session, target, pinned, transfer_id, result, leg)
            cut = Cut("migration", target=target, export=pinned, transfer_id=transfer_id, leg=leg)
            if not session.interrupt(cut):
                if session.failovers != failovers:
                    raise _Abort(MigrationFailure.FAILED_OVER, "the request failed over meanwhile")
                raise _Abort(
                    MigrationFailure.BETWEEN_INSTANCES,
                    "the request finished or is between instances",
                )
            pinned = None  # from here on, the session's legs own the export
            async with asyncio.timeout_at(deadline):
                await cut.done.wait()
            if cut.failed_over:
                raise _Abort(MigrationFailure.FAILED_OVER, cut.error or "failed over")
            if cut.error is not None and not cut.taken:
                raise _Abort(MigrationFailure.BETWEEN_INSTANCES, cut.error)
            if cut.error is not None:
                raise _Abort(MigrationFailure.CONTINUATION_FAILED, cut.error)
            result.status = MigrationStatus.COMPLETED
            result.downtime_s = cut.downtime_s
            self._count_bytes(session, cut, result)
        except _Abort as e:
            result.failure, result.reason = e.failure, str(e)
        except (APIError, UpstreamBroken) as e:
            result.failure, result.reason = MigrationFailure.UPSTREAM_ERROR, str(e)
        except asyncio.TimeoutError:
            result.failure, result.reason = MigrationFailure.TIMED_OUT, "timed out"
        finally:
            if pinned is not None or (pin_sent and result.status is not MigrationStatus.COMPLETED):
                # Also when the Pin's answer never came: the engine may have pinned late.
                await self._unpin(source, pinned, transfer_id)
        result.duration_s = time.perf_counter() - started
        if result.status is MigrationStatus.COMPLETED:
            self.ctx.metrics.migration_seconds.observe(result.duration_s)
        return result

    def _check_movable(self, session: RequestSession, target: str) -> None:
        if session.finish_reason is not None:
            raise _Abort(MigrationFailure.FINISHED, "the request has finished")
        if session.instance_id == target:
            raise _Abort(MigrationFailure.ALREADY_THERE, "already there")
        view = self.ctx.control.snapshot().get(target)
        if view is None or not view.usable or not view.can_decode:
            raise _Abort(MigrationFailure.TARGET_UNUSABLE, f"{target} cannot take the request")

    def _control_address(self, instance_id: str) -> str:
        record = self.ctx.control.record(instance_id)
        if record is None or not record.info.control_address:
            raise _Abort(
                MigrationFailure.NO_CONTROL_ADDRESS, f"{instance_id} has no engine control address"
            )
        return record.info.control_address

    async def _pin(self, session: RequestSession, source: str, transfer_id: str) -> Pinned | None:
        reply = await self.ctx.kv.call(
            self._control_address(source),
            lambda rid: Pin(rid=rid, request_key=session.key, transfer_id=transfer_id),
            CONTROL_TIMEOUT_S,
        )
        if isinstance(reply, Pinned):
            return reply
        if isinstance(reply, Failed) and reply.code == KVFailure.REQUEST_WAITING:
            return None  # still queued there: nothing to copy, it simply moves
        error = reply.error if isinstance(reply, Failed) else repr(reply)
        raise _Abort(MigrationFailure.EXPORT_REFUSED, f"{source} refused to export: {error}")

    async def _unpin(self, source: str, pinned: Pinned | None, transfer_id: str) -> None:
        """Before the cut: stop exporting; if the request ended meanwhile, free its blocks."""
        try:
            reply = await self.ctx.kv.call(
                self._control_address(source),
                lambda rid: Unpin(rid=rid, transfer_id=transfer_id),
                CONTROL_TIMEOUT_S,
            )
        except (asyncio.TimeoutError, _Abort):
            reply = None
        if not isinstance(reply, Failed) or pinned is None:
            return
        self.ctx.kv.release(pinned.addresses, transfer_id)

    async def _precopy(
        self,
        session: RequestSession,
        target: str,
        pinned: Pinned,
        transfer_id: str,
        result: MigrationResult,
        leg: int,
    ) -> None:
        """Copies full blocks into the target's prefix cache while the source decodes."""
        block_size = pinned.block_size
        copied = 0
        for stage in range(self.settings.max_precopy_stages):
            if session.finish_reason is not None or session.prompt_ids is None:
                raise _Abort(MigrationFailure.FINISHED, "the request finished during pre-copy")
            if session.legs != leg:
                raise _Abort(
                    MigrationFailure.FAILED_OVER, "the request failed over during pre-copy"
                )
            tokens = session.prompt_ids + session.output_ids
            full = (len(tokens) - 1) // block_size
            if full <= copied or (stage > 0 and full - copied < 1):
                break
            prompt = tokens[: full * block_size]
            source = SourceSpec(
                transfer_id=transfer_id,
                instance_id=pinned.instance_id,
                addresses=pinned.addresses,
                num_tokens=len(prompt),
                block_size=block_size,
                cache_fingerprint=pinned.cache_fingerprint,
                tokens_digest=tokens_digest(prompt),
                keep=True,
            )
            body = precopy_request(session, prompt, source)
            url = self.ctx.control.url(target) + "/v1/completions"
            await self.ctx.upstream.post_json(url, body)
            result.stages += 1
            result.precopied_blocks += full - copied
            copied = full

    def _count_bytes(self, session: RequestSession, cut: Any, result: MigrationResult) -> None:
        export = cut.export
        if export is None or session.prompt_ids is None:
            return
        blocks = -(-(len(session.prompt_ids) + len(session.output_ids)) // export.block_size)
        self.ctx.metrics.migration_bytes.inc(blocks * export.bytes_per_block)

    # --- drain and the rescheduling loop ------------------------------------------------------

    def drain(self, instance_id: str) -> int:
        """Moves every request off an instance (already out of rotation); returns how many."""
        sessions = {s.key: s for s in self.sessions.on(instance_id)}
        snapshot = self.ctx.control.snapshot()
        for plan in plan_drain(snapshot, instance_id, list(sessions), self.watermark):
            self.start(sessions[plan.request_key], plan.target)
        return len(sessions)

    def start_loop(self) -> None:
        if self.settings.rescheduling and self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop(), name="pdserve-rescheduler")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        for task in list(self.moving.values()):
            task.cancel()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reschedule_interval_s)
            try:
                self.reschedule_once()
            except Exception:
                logger.exception("pdserve: rescheduling round failed")

    def reschedule_once(self) -> int:
        snapshot = self.ctx.control.snapshot()
        preempted = preempted_since(snapshot, self._preemptions)
        budget = self.settings.max_migrations - len(self.moving)
        now = time.monotonic()
        backoff = RETRY_AFTER_ROUNDS * self.settings.reschedule_interval_s
        self._failed_at = {k: t for k, t in self._failed_at.items() if now - t < backoff}
        left_alone = set(self.moving) | set(self._failed_at)
        plans = plan_round(
            self.ctx.control.policy,
            snapshot,
            self.settings,
            left_alone,
            preempted,
            budget,
            self.watermark,
        )
        started = 0
        for plan in plans:
            session = self.sessions.find(plan.request_key)
            if session is not None and session.instance_id == plan.source:
                self.start(session, plan.target)
                started += 1
        return started
