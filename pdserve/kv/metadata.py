"""What the two halves of the connector exchange, and the version of the KV protocol.

Like vLLM's NIXL connector keeps its shared structs in a metadata module, this module holds
the per-step orders the scheduler side (in vLLM's EngineCore) hands the worker side (in each
worker) through the step's ``KVConnectorMetadata``. It imports neither torch nor vLLM, so the
scheduler side, the gateway and unit tests can use it without a model runtime.

``PROTOCOL_VERSION`` names the version of the worker-to-worker KV protocol (the messages of
``pdserve.kv.messages`` and how blocks move over a pair). Each ``PairOpen`` carries it and
each ``PairOpened`` answers with it; a worker refuses a peer of another version with a
``Failed`` of code ``KVFailure.PROTOCOL_MISMATCH`` naming both versions. A peer from before
versioning sends none, which reads as version 0. Raise it whenever a change would make an
old and a new worker misunderstand each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# 1: the first versioned handshake. 2: PairClose (a broken pair is closed on both sides).
# 3: Ping/Pong liveness probes, PairOpen.address (the initiator's KV server, probed by the
# server), PullRequest.needs_tokens (refused with NOT_COMPUTED beyond the computed KV).
PROTOCOL_VERSION = 3


def loads_synchronously(
    missing_tokens: int, local_hit_tokens: int, block_size: int, max_tokens: int
) -> bool:
    """Whether a load of ``missing_tokens`` (all but the last, which the step computes) runs
    inside the step that admits its request instead of in the background.

    A synchronous load costs that step the transfer but saves the request the extra engine
    steps of an asynchronous one (it is parked, its load reported, then scheduled). Loads of
    at most ``max_tokens`` (``--kv-sync-load-max-tokens``; 0: none) qualify, and so does any
    load that fits in one block beyond a local prefix-cache hit: that is a migration's tail
    after its pre-copy (up to one partial block, so up to 127 tokens with vLLM's 128-token
    CPU blocks, where a 64-token limit alone left every other cut asynchronous), and at most
    two blocks' transfer on the step.
    """
    tail = missing_tokens - 1
    if max_tokens <= 0 or tail <= 0:
        return False
    limit = max(max_tokens, block_size) if local_hit_tokens > 0 else max_tokens
    return tail <= limit


@dataclass
class ExportOrder:
    """Scheduler → worker: keep these blocks of a request for pulls.

    ``owns``: the request has ended and vLLM keeps its blocks for this export (a finished
    prefill). A *live* export (``owns=False``) is a request that is still decoding: its blocks
    can be read as they fill, but only vLLM may free them, until an ``ExportUpdate`` hands
    them over when the request ends.
    """

    transfer_id: str
    req_id: str
    block_ids: list[int]
    lease_s: float
    owns: bool = True
    # Positions whose KV the blocks hold now (a pull relying on more is refused with
    # NOT_COMPUTED); None: no check. A live export's count grows with ``ExportUpdate``.
    num_computed_tokens: int | None = None


@dataclass
class ExportUpdate:
    """Scheduler → worker: a live export grew, took over its blocks, or became void."""

    transfer_id: str
    req_id: str
    block_ids: list[int] | None = None
    # The request ended and its blocks are kept for this export from now on.
    owns: bool = False
    # Stop exporting without freeing anything (unpinned, or preempted: blocks invalid).
    void: bool = False
    # The request has computed this many positions' KV by now (None: unchanged).
    num_computed_tokens: int | None = None


@dataclass
class LoadOrder:
    """Scheduler → worker: pull blocks first, first + 1, ... of an export into ``dst``.

    No destination blocks means nothing needs copying; a last pull then releases the export.
    """

    req_id: str
    transfer_id: str
    # KV server of each TP rank of the exporter; worker r pulls from addresses[r].
    addresses: list[str]
    first: int
    dst: list[int]
    # After this pull the exporter may free the blocks (False: a migration pre-copy).
    last: bool = True
    # Positions of the export whose KV the request relies on (all but its last token).
    needs_tokens: int = 0
    # Synchronous: the worker finishes it before this step's forward, which computes the
    # request's last token on top of it (vLLM scheduled the request in this very step).
    sync: bool = False


@dataclass
class ReleaseOrder:
    """Scheduler → worker: tell the exporting instance its blocks will not be pulled."""

    transfer_id: str
    addresses: list[str]


@dataclass
class StepOrders:
    """What the workers must do this step (the connector metadata's payload).

    Built once per engine step by ``SchedulerSide.build_orders``; every worker receives the
    same orders and applies them in this order: exports, updates, loads, releases.
    """

    exports: list[ExportOrder] = field(default_factory=list)
    updates: list[ExportUpdate] = field(default_factory=list)
    loads: list[LoadOrder] = field(default_factory=list)
    releases: list[ReleaseOrder] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.exports or self.updates or self.loads or self.releases)
