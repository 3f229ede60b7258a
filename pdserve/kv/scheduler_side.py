"""The scheduler half of the connector: decides what to export, what to load, and from where.

It runs inside vLLM's EngineCore process. vLLM's ``Scheduler`` calls it on the engine's own
thread; those calls never wait on the network: their decisions travel to the workers in the
step's connector metadata (``StepOrders``, see ``pdserve.kv.metadata``). It does do I/O of
its own, though: with a ``control_port`` it runs the engine control server (a ZeroMQ
``Messenger`` with its own I/O thread) that the gateway pins and unpins requests through
for migration. Commands arriving there are queued and answered on the engine thread, once
per step, in ``build_orders`` (replies are handed to the messenger's thread, not sent inline).
It imports no torch.

Producer (prefill instance): a request carrying ``{"pdserve": {"export": ...}}`` keeps its
blocks when it finishes (``request_finished`` returns ``delay_free=True``), and the response
carries a ``SourceSpec`` that tells a decode instance where to pull from.

Consumer (decode instance): a request carrying ``{"pdserve": {"source": ...}}`` reports its
prompt as an asynchronous external load; vLLM allocates blocks and parks the request until
the workers report the pull finished. A source that does not match (other block size,
layout or tokens) is not trusted: the request is prefilled locally and the export released.
"""

from __future__ import annotations

import hashlib
import json
import queue
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdserve.kv.messages import (
    Ack,
    Failed,
    KVFailure,
    KVMessage,
    Pin,
    Pinned,
    SourceSpec,
    TransferParams,
    Unpin,
    params_to_json,
    parse_params,
    tokens_digest,
)
from pdserve.kv.messenger import Messenger
from pdserve.kv.metadata import (
    ExportOrder,
    ExportUpdate,
    LoadOrder,
    ReleaseOrder,
    StepOrders,
    loads_synchronously,
)
from pdserve.kv.settings import KVSettings
from pdserve.logs import get_logger
from pdserve.protocol.net import cdiv
from pdserve.protocol.wire import Codec

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = get_logger(__name__)


@dataclass
class LiveExport:
    """A running request pinned for migration, and how much of it the worker knows."""

    transfer_id: str
    known_blocks: int
    # Positions with KV the worker was last told of (pulls relying on more are refused).
    known_computed: int = 0
    request: Request | None = None


def cache_fingerprint(kv_cache_config: KVCacheConfig, tp_size: int) -> str:
    """What two instances must share for their blocks to be interchangeable.

    A digest of the cache geometry vLLM configured (TP size, cache layout, per group the
    layer names, spec type, block size, KV heads, head size, dtype). Sources carry it
    (``SourceSpec.cache_fingerprint``); it is not the workers' plane digest (``KVLayout``).
    """
    description: list[Any] = [tp_size, kv_cache_config.kv_cache_layout]
    for group in kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        description.append(
            [
                sorted(group.layer_names),
                type(spec).__name__,
                spec.block_size,
                getattr(spec, "num_kv_heads", None),
                getattr(spec, "head_size", None),
                str(getattr(spec, "dtype", None)),
            ]
        )
    return hashlib.sha256(json.dumps(description, default=str).encode()).hexdigest()[:16]


class SchedulerSide:
    """The connector's scheduler role, one per EngineCore (see the module docstring).

    Every method but ``_receive_control`` runs on the engine thread, called by vLLM's
    ``Scheduler`` through ``PdConnector``; none of them blocks.
    """

    def __init__(
        self,
        vllm_config: VllmConfig,
        kv_cache_config: KVCacheConfig,
        settings: KVSettings,
        secret: bytes,
    ) -> None:
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError(
                f"pdserve's connector supports models with one KV cache group, not {len(groups)}"
            )
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size != 1:
            raise ValueError("pdserve's connector does not support pipeline parallelism")
        self.settings = settings
        self.block_size = groups[0].kv_cache_spec.block_size
        self.tp_size = parallel.tensor_parallel_size
        self.cache_fingerprint = cache_fingerprint(kv_cache_config, self.tp_size)
        self.addresses = [settings.address_of_rank(r) for r in range(self.tp_size)]
        self._orders = StepOrders()
        self._local_hits: dict[str, int] = {}
        # Requests whose load get_num_new_matched_tokens made synchronous (until allocated).
        self._sync_loads: set[str] = set()
        # Requests whose import was decided (loading, loaded, or refused): asked again after a
        # failed load under the "recompute" policy, they are then prefilled locally.
        self._import_decided: set[str] = set()
        self._kv_cache_manager: KVCacheManager | None = None
        self._by_key: dict[str, Request] = {}
        self._live: dict[str, LiveExport] = {}
        self.bytes_per_block = sum(
            getattr(g.kv_cache_spec, "page_size_bytes", 0) * len(g.layer_names) for g in groups
        )
        self._control_inbox: queue.SimpleQueue[tuple[bytes, Any]] = queue.SimpleQueue()
        self._control: Messenger | None = None
        if settings.control_port:
            self._control = Messenger(
                Codec(KVMessage, secret),
                f"tcp://{settings.host}:{settings.control_port}",
                on_request=self._receive_control,
                on_store_set=lambda message: None,
                name="pdserve-engine-control",
            )

    def bind(self, kv_cache_manager: KVCacheManager) -> None:
        """Once, from the scheduler's constructor: the manager that knows running blocks."""
        self._kv_cache_manager = kv_cache_manager

    # --- consumer --------------------------------------------------------------------------

    def _untrusted_reason(
        self, request: Request, source: SourceSpec
    ) -> tuple[KVFailure, str] | None:
        if source.block_size != self.block_size:
            return (
                KVFailure.BLOCK_SIZE_MISMATCH,
                f"block size {source.block_size} != {self.block_size}",
            )
        if source.cache_fingerprint != self.cache_fingerprint:
            return (
                KVFailure.CACHE_MISMATCH,
                f"cache fingerprint {source.cache_fingerprint} != {self.cache_fingerprint} "
                "(other model, dtype, cache layout or tensor parallelism)",
            )
        if len(source.addresses) != self.tp_size:
            return (
                KVFailure.TP_MISMATCH,
                f"source has {len(source.addresses)} TP ranks, this instance {self.tp_size}",
            )
        if not request.num_tokens - 1 <= source.num_tokens <= request.num_tokens:
            return (
                KVFailure.TOKENS_MISMATCH,
                f"source covers {source.num_tokens} of {request.num_tokens} tokens",
            )
        covered = request.all_token_ids[: source.num_tokens]
        if tokens_digest(covered) != source.tokens_digest:
            return (
                KVFailure.TOKENS_MISMATCH,
                "source computed other tokens than this request's prompt",
            )
        return None

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        """Tokens of a waiting request to load from its source, and whether asynchronously.

        Called by ``Scheduler.schedule`` for a waiting request each step it is considered
        for admission (so possibly several times, e.g. while no blocks are free). A trusted
        source yields every token beyond the local prefix-cache hit, loaded asynchronously
        (or, when ``loads_synchronously`` says so — a migration's tail —, synchronously: all
        but the last token, which this step computes);
        an untrusted one yields 0 once, queues a release of the export for this step's
        orders, and the request is prefilled locally. Only in-memory state changes.
        """
        params = parse_params(request.kv_transfer_params)
        if params is None or params.source is None:
            return 0, False
        if request.request_id in self._import_decided:
            return 0, False
        source = params.source
        untrusted = self._untrusted_reason(request, source)
        if untrusted is not None:
            failure, reason = untrusted
            logger.warning(
                "pdserve kv: not loading %s from %s (%s: %s); prefilling locally",
                request.request_id,
                source.instance_id,
                failure,
                reason,
            )
            self._import_decided.add(request.request_id)
            self._orders.releases.append(ReleaseOrder(source.transfer_id, source.addresses))
            return 0, False
        self._local_hits[request.request_id] = num_computed_tokens
        missing = request.num_tokens - num_computed_tokens
        if loads_synchronously(
            missing, num_computed_tokens, self.block_size, self.settings.sync_load_max_tokens
        ):
            # A small load (a migration's tail) runs in this step: vLLM schedules the last
            # token at once, so the request produces a token one step after admission
            # instead of after the load's extra steps.
            self._sync_loads.add(request.request_id)
            return missing - 1, False
        self._sync_loads.discard(request.request_id)
        return missing, True

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        """Orders the load of a request that was just given blocks (``num_external_tokens``).

        Called by ``Scheduler.schedule`` for every request it allocates blocks to; only calls
        with external tokens (after ``get_num_new_matched_tokens`` said so) order anything:
        one ``LoadOrder`` for this step's metadata, of the blocks between the local hit and
        the block holding the last prompt token (that one is recomputed here).
        """
        if num_external_tokens == 0:
            return
        params = parse_params(request.kv_transfer_params)
        assert params is not None and params.source is not None
        source = params.source
        self._import_decided.add(request.request_id)
        local_hit = self._local_hits.pop(request.request_id, 0)
        local_blocks = blocks.get_block_ids()[0]
        first = local_hit // self.block_size
        # The last token is recomputed here, so the blocks holding positions before it are
        # all that is needed (a block holding only the last position needs no data).
        end = min(cdiv(request.num_tokens - 1, self.block_size), len(local_blocks))
        dst = list(local_blocks[first:end]) if end > first else []
        self._orders.loads.append(
            LoadOrder(
                request.request_id,
                source.transfer_id,
                source.addresses,
                first,
                dst,
                last=not source.keep,
                needs_tokens=request.num_tokens - 1,
                sync=request.request_id in self._sync_loads,
            )
        )
        self._sync_loads.discard(request.request_id)
        logger.debug(
            "pdserve kv: request %s loads %s (%d blocks)",
            request.request_id,
            source.transfer_id,
            end - first,
        )

    # --- producer --------------------------------------------------------------------------

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Whether vLLM must keep a finished request's blocks, and the params to return.

        Called by the scheduler exactly once per request when it finishes or is aborted,
        before its blocks are freed. An export request that finished normally keeps its
        blocks (``ExportOrder`` with a lease) and answers with the ``SourceSpec`` a decode
        instance pulls from; a pinned request's blocks go over to its live export. Anything
        else (no export asked, aborted, no blocks) frees at once. Only in-memory state.
        """
        from vllm.v1.request import RequestStatus

        req_id = request.request_id
        self._local_hits.pop(req_id, None)
        self._sync_loads.discard(req_id)
        self._import_decided.discard(req_id)
        self._forget_key(request)
        live = self._live.pop(req_id, None)
        if live is not None:
            # A pinned request ended (the gateway cut it to move it, or it finished): its
            # blocks stay for the last pull, and the export takes them over.
            # Only blocks holding computed positions: vLLM may have allocated more ahead.
            computed = request.num_computed_tokens
            self._orders.updates.append(
                ExportUpdate(
                    live.transfer_id,
                    req_id,
                    block_ids=list(block_ids[: cdiv(computed, self.block_size)]),
                    owns=True,
                    num_computed_tokens=computed,
                )
            )
            return True, None
        params = parse_params(request.kv_transfer_params)
        if params is None or params.export is None:
            return False, None
        finished_normally = request.status in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH_CAPPED,
        )
        num_tokens = request.num_computed_tokens
        blocks = block_ids[: cdiv(num_tokens, self.block_size)]
        if not finished_normally or not blocks:
            return False, None
        transfer_id = params.export.transfer_id
        self._orders.exports.append(
            ExportOrder(
                transfer_id, req_id, blocks, self.settings.lease_s, num_computed_tokens=num_tokens
            )
        )
        source = SourceSpec(
            transfer_id=transfer_id,
            instance_id=self.settings.instance_id,
            addresses=self.addresses,
            num_tokens=num_tokens,
            block_size=self.block_size,
            cache_fingerprint=self.cache_fingerprint,
            tokens_digest=tokens_digest(request.all_token_ids[:num_tokens]),
        )
        return True, params_to_json(TransferParams(source=source))

    # --- migration: live exports of running requests ----------------------------------------

    def on_new_request(self, request: Request) -> None:
        """Once per request, when vLLM adds it: remembers its gateway key (for ``Pin``)."""
        params = parse_params(request.kv_transfer_params)
        if params is not None and params.request_key:
            self._by_key[params.request_key] = request

    def _forget_key(self, request: Request) -> None:
        params = parse_params(request.kv_transfer_params)
        if params is not None and params.request_key:
            known = self._by_key.get(params.request_key)
            if known is request:
                del self._by_key[params.request_key]

    def _receive_control(self, identity: bytes, message: Any) -> None:
        """Called on the control server's thread: hand the command to the engine thread."""
        self._control_inbox.put((identity, message))

    def _handle_control(self) -> None:
        """Runs on the engine thread, where the scheduler's state may be read safely."""
        while not self._control_inbox.empty():
            identity, message = self._control_inbox.get_nowait()
            reply: Any
            if isinstance(message, Pin):
                reply = self._pin(message)
            elif isinstance(message, Unpin):
                reply = self._unpin(message)
            else:
                reply = Failed(
                    rid=getattr(message, "rid", 0),
                    code=KVFailure.UNEXPECTED_MESSAGE,
                    error=f"unexpected command {type(message).__name__}",
                )
            assert self._control is not None
            self._control.reply(identity, reply)

    def _pin(self, message: Pin) -> Any:
        from vllm.v1.request import RequestStatus

        request = self._by_key.get(message.request_key)
        if request is None:
            return Failed(
                rid=message.rid, code=KVFailure.UNKNOWN_REQUEST, error="no such request here"
            )
        if request.status != RequestStatus.RUNNING:
            # Still waiting (queued, or loading its KV): it holds no blocks worth copying.
            waiting = request.status < RequestStatus.RUNNING
            return Failed(
                rid=message.rid,
                code=KVFailure.REQUEST_WAITING if waiting else KVFailure.NOT_RUNNING,
                error=f"request is {request.status.name.lower()}",
            )
        if request.request_id in self._live:
            return Failed(
                rid=message.rid, code=KVFailure.ALREADY_PINNED, error="request is already pinned"
            )
        computed = request.num_computed_tokens
        if computed < request.num_tokens - 1:
            # Running again after a preemption, its tokens' KV is being recomputed: blocks
            # beyond ``computed`` hold nothing yet (or another request's KV), and the gateway
            # knows every token, so it would copy them. It retries once the KV is back.
            return Failed(
                rid=message.rid,
                code=KVFailure.RECOMPUTING,
                error=f"request has the KV of {computed} of its {request.num_tokens} tokens "
                "(recomputing after a preemption)",
            )
        assert self._kv_cache_manager is not None
        blocks = list(self._kv_cache_manager.get_block_ids(request.request_id)[0])
        self._live[request.request_id] = LiveExport(
            message.transfer_id, len(blocks), computed, request
        )
        self._orders.exports.append(
            ExportOrder(
                message.transfer_id,
                request.request_id,
                blocks,
                self.settings.lease_s,
                owns=False,
                num_computed_tokens=computed,
            )
        )
        return Pinned(
            rid=message.rid,
            num_computed_tokens=computed,
            block_size=self.block_size,
            bytes_per_block=self.bytes_per_block,
            cache_fingerprint=self.cache_fingerprint,
            addresses=self.addresses,
            instance_id=self.settings.instance_id,
        )

    def _unpin(self, message: Unpin) -> Any:
        for req_id, live in list(self._live.items()):
            if live.transfer_id == message.transfer_id:
                del self._live[req_id]
                self._orders.updates.append(ExportUpdate(live.transfer_id, req_id, void=True))
                return Ack(rid=message.rid)
        return Failed(
            rid=message.rid,
            code=KVFailure.NOT_PINNED,
            error="not pinned (the request has ended)",
        )

    def _track_live(self, scheduler_output: SchedulerOutput) -> None:
        for req_id in scheduler_output.preempted_req_ids or ():
            live = self._live.pop(req_id, None)
            if live is not None:
                # vLLM freed the blocks: reads in flight are invalid, the migration is off.
                logger.warning("pdserve kv: pinned request %s was preempted", req_id)
                self._orders.updates.append(ExportUpdate(live.transfer_id, req_id, void=True))
        assert self._kv_cache_manager is not None or not self._live
        for req_id, live in self._live.items():
            blocks = self._kv_cache_manager.get_block_ids(req_id)[0]  # type: ignore[union-attr]
            request = live.request
            computed = live.known_computed if request is None else request.num_computed_tokens
            # News at every step that added a block or computed positions: the cut's last
            # pull relies on the positions up to the request's last token, so the exporter
            # must know them without waiting for the request to end.
            grew = len(blocks) != live.known_blocks
            if grew or computed != live.known_computed:
                live.known_blocks, live.known_computed = len(blocks), computed
                self._orders.updates.append(
                    ExportUpdate(
                        live.transfer_id,
                        req_id,
                        block_ids=list(blocks) if grew else None,
                        num_computed_tokens=computed,
                    )
                )

    # --- every step ------------------------------------------------------------------------

    def build_orders(self, scheduler_output: SchedulerOutput) -> StepOrders:
        """This step's orders for the workers; called once per step at the end of schedule.

        First answers the engine control commands that arrived since the last step (replies
        are queued to the control server's thread), then follows pinned requests (grown,
        preempted), then hands over and resets everything decided since the last call.
        """
        self._handle_control()
        if self._live:
            self._track_live(scheduler_output)
        orders, self._orders = self._orders, StepOrders()
        return orders

    def shutdown(self) -> None:
        """Once, when the engine shuts down: stops the control server (joins its thread)."""
        if self._control is not None:
            self._control.stop()
