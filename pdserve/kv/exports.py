"""The exports a worker holds for pulls, and how each one ends (torch-free).

An *export* is a set of blocks the scheduler side asked to keep for a pull (a finished
prefill, or a live request that is moving away). The worker's KV server claims an export for
each pull it serves (``begin_pull``/``end_pull``); the model thread registers and updates
exports from the step's orders; ``expire`` runs once per step. All of it under one lock.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from pdserve.kv.messages import KVFailure, PullRequest
from pdserve.kv.metadata import ExportOrder, ExportUpdate
from pdserve.logs import get_logger

logger = get_logger(__name__)

FINISHED_IDS_KEPT = 4096
# Longest a pull waits for a running request's live export to catch up with it (a step or
# two; the scheduler side reports the computed positions of pinned requests every step).
LIVE_CATCH_UP_S = 2.0

# How a finished export refuses a late pull.
_FINISHED_TEXT = {
    KVFailure.ALREADY_PULLED: "transfer {} was already pulled",
    KVFailure.RELEASED: "transfer {} was released",
    KVFailure.LEASE_EXPIRED: "the lease of transfer {} expired before it was pulled",
    KVFailure.EXPORT_VOID: "transfer {} is void (unpinned, or its request was preempted)",
}


class Refusal(str):
    """Why a pull was refused: the text (for logs and ``Failed.error``) and its ``failure``."""

    failure: KVFailure

    def __new__(cls, failure: KVFailure, text: str) -> Refusal:
        refusal = super().__new__(cls, text)
        refusal.failure = failure
        return refusal


def _covers(export: _Export, request: PullRequest, end: int) -> bool:
    """The export has the blocks and the computed positions the pull relies on."""
    computed = export.computed_tokens
    return end <= len(export.blocks) and (computed is None or computed >= request.needs_tokens)


def _refusal(failure: KVFailure, transfer_id: str) -> Refusal:
    return Refusal(failure, _FINISHED_TEXT[failure].format(transfer_id))


@dataclass
class _Export:
    transfer_id: str
    req_id: str
    blocks: list[int]
    lease_s: float
    owns: bool
    deadline: float | None = None
    pulls_in_flight: int = 0
    closing: bool = False
    # Why it is closing (the code a pull arriving from now on is refused with).
    closed_by: KVFailure | None = None
    valid: bool = True
    void: bool = False
    # Positions whose KV the blocks hold (None: not checked), see ``begin_pull``.
    computed_tokens: int | None = None

    def close(self, why: KVFailure) -> None:
        if not self.closing:
            self.closing, self.closed_by = True, why


class ExportRegistry:
    """Exports waiting to be pulled.

    Invariant: a request is reported finished (so that vLLM frees its blocks) exactly once,
    and only if its export owns the blocks; a live export is never reported, since its
    request still runs and vLLM owns its blocks.
    """

    def __init__(self) -> None:
        self._exports: dict[str, _Export] = {}
        # Releases that arrived before their export was registered (transfer id → expiry).
        self._tombstones: dict[str, float] = {}
        # Recently finished transfers and how each ended, so a late pull is refused at once
        # (with the right code) instead of waiting.
        self._finished_ids: OrderedDict[str, KVFailure] = OrderedDict()
        self._changed = threading.Condition()
        self.finished: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.expired_count = 0

    def __len__(self) -> int:
        return len(self._exports)

    def add(self, order: ExportOrder) -> None:
        with self._changed:
            export = _Export(
                order.transfer_id,
                order.req_id,
                list(order.block_ids),
                order.lease_s,
                owns=order.owns,
                computed_tokens=order.num_computed_tokens,
            )
            self._exports[order.transfer_id] = export
            if order.owns:
                export.deadline = time.monotonic() + order.lease_s
            if self._tombstones.pop(order.transfer_id, None) is not None:
                export.close(KVFailure.RELEASED)
                self._finish_if_idle(export)
            self._changed.notify_all()

    def update(self, update: ExportUpdate) -> None:
        with self._changed:
            export = self._exports.get(update.transfer_id)
            if export is None:
                if update.owns:
                    # Nothing left to pull for: free the blocks vLLM just handed over.
                    self.finished.put(update.req_id)
                return
            if update.block_ids is not None:
                export.blocks = list(update.block_ids)
            if update.num_computed_tokens is not None:
                export.computed_tokens = update.num_computed_tokens
            if update.void:
                export.valid = False
                export.void = True
                export.close(KVFailure.EXPORT_VOID)
            elif update.owns:
                export.owns = True
                export.deadline = time.monotonic() + export.lease_s
            self._finish_if_idle(export)
            self._changed.notify_all()

    def begin_pull(self, request: PullRequest) -> tuple[_Export, list[int]] | Refusal:
        """Claims an export for one pull and resolves the blocks; else why not.

        Blocks the calling thread (a serving thread of the KV server) for up to
        ``request.wait_s`` while the export has not been registered yet.
        """
        transfer_id = request.transfer_id
        with self._changed:
            ended = self._finished_ids.get(transfer_id)
            if ended is not None:
                return _refusal(ended, transfer_id)
            self._changed.wait_for(
                lambda: transfer_id in self._exports or transfer_id in self._tombstones,
                timeout=request.wait_s,
            )
            export = self._exports.get(transfer_id)
            if export is None:
                if transfer_id in self._tombstones:
                    return _refusal(KVFailure.RELEASED, transfer_id)
                return Refusal(KVFailure.UNKNOWN_TRANSFER, f"unknown transfer {transfer_id}")
            end = request.first + len(request.dst)
            if not export.owns:
                # A live export whose request is still running: the cut's pull can arrive
                # before the step that told this worker of the positions it relies on.
                self._changed.wait_for(
                    lambda: export.closing or export.owns or _covers(export, request, end),
                    timeout=min(request.wait_s, LIVE_CATCH_UP_S),
                )
            if export.closing:
                why = export.closed_by or KVFailure.RELEASED
                return Refusal(why, f"transfer {transfer_id} is closing ({why})")
            if request.first < 0 or end > len(export.blocks):
                return Refusal(
                    KVFailure.OUT_OF_RANGE,
                    f"pull asks for blocks {request.first}..{end} of {len(export.blocks)}",
                )
            computed = export.computed_tokens
            if computed is not None and request.needs_tokens > computed:
                # A live export of a request that has not computed these positions (yet):
                # its blocks hold no KV there, or another request's. Nothing is claimed.
                return Refusal(
                    KVFailure.NOT_COMPUTED,
                    f"pull relies on {request.needs_tokens} positions of transfer "
                    f"{transfer_id}, which has the KV of {computed}",
                )
            export.pulls_in_flight += 1
            if request.last:
                export.close(KVFailure.ALREADY_PULLED)
            return export, export.blocks[request.first : end]

    def end_pull(self, export: _Export) -> None:
        with self._changed:
            export.pulls_in_flight -= 1
            self._finish_if_idle(export)

    def release(self, transfer_id: str, tombstone_s: float) -> None:
        with self._changed:
            export = self._exports.get(transfer_id)
            if export is None:
                if transfer_id not in self._finished_ids:  # else it has ended already
                    self._tombstones[transfer_id] = time.monotonic() + tombstone_s
                return
            export.close(KVFailure.RELEASED)
            self._finish_if_idle(export)

    def expire(self) -> None:
        now = time.monotonic()
        with self._changed:
            for export in list(self._exports.values()):
                expired = export.deadline is not None and export.deadline < now
                if expired and export.pulls_in_flight == 0:
                    logger.warning(
                        "pdserve kv: lease of transfer %s expired unpulled; freeing %d blocks",
                        export.transfer_id,
                        len(export.blocks),
                    )
                    self.expired_count += 1
                    export.close(KVFailure.LEASE_EXPIRED)
                    self._finish_if_idle(export)
            for transfer_id, expiry in list(self._tombstones.items()):
                if expiry < now:
                    del self._tombstones[transfer_id]

    def _finish_if_idle(self, export: _Export) -> None:
        if not export.closing or export.pulls_in_flight:
            return
        if not (export.owns or export.void):
            return  # pulled or released while live: finished once vLLM hands the blocks over
        if self._exports.pop(export.transfer_id, None) is None:
            return
        if export.owns:
            self.finished.put(export.req_id)
        self._finished_ids[export.transfer_id] = export.closed_by or KVFailure.RELEASED
        while len(self._finished_ids) > FINISHED_IDS_KEPT:
            self._finished_ids.popitem(last=False)
