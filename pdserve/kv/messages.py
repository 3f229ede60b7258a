"""KV-control messages between workers (and from the gateway), and the transfer parameters.

Two kinds of data cross instance boundaries:

- ``kv_transfer_params`` travel inside OpenAI requests and responses (JSON). Under the key
  ``"pdserve"`` they say what an instance should export (``ExportSpec``) or import
  (``SourceSpec``, as returned by the exporting instance).
- Worker-to-worker messages travel over ZeroMQ in the authenticated envelope of
  ``pdserve.protocol.wire``: pair set-up (the rendezvous of a torch.distributed process group
  of two), pulls, and releases.

Every refusal or failure carries a ``KVFailure``: a stable code to branch on, next to a text
for logs and people. Nobody branches on the text.

Two digests say whether two instances' caches fit together, at two levels:

- the *cache fingerprint* (``SourceSpec.cache_fingerprint``, ``Pinned.cache_fingerprint``,
  computed by the scheduler side from vLLM's ``KVCacheConfig``): the cache geometry an
  instance promises — TP size, cache layout, per layer group the layer names, spec type,
  block size, KV heads, head size, dtype. A decode instance refuses a source whose
  fingerprint differs from its own before any block moves;
- the *plane digest* (``PairOpen.plane_digest``, computed by each worker from the tensors it
  registered, ``KVLayout.plane_digest``): the ordered list of block planes a worker sends or
  receives — layer name, shape of one block, dtype per plane. Two workers only pair if their
  plane lists agree, so that message i of a transfer lands in plane i on both sides.

This module imports no torch, so the gateway can use it.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

PARAMS_KEY = "pdserve"

# (first source block, first destination block, number of blocks): a run of consecutive
# blocks on both sides, sent as one message per layer.
Run = tuple[int, int, int]


class SourceSpec(msgspec.Struct, frozen=True):
    """Where a request's KV lives: an export on another instance.

    Blocks are named by their position in the exported request (0, 1, ...); the exporter
    resolves positions to its physical blocks, which may still be growing (a live export of
    a request that is decoding, see ``Pin``).
    """

    transfer_id: str
    instance_id: str
    # KV server address of each tensor-parallel rank, "tcp://host:port".
    addresses: list[str]
    # Tokens whose KV the export holds (a prefix of the request's tokens).
    num_tokens: int
    block_size: int
    # The exporter's cache fingerprint (see the module docstring), checked by the importer.
    cache_fingerprint: str
    # SHA-256 prefix of the token ids covered, checked by the importer.
    tokens_digest: str
    # Keep the export after this pull (a migration's pre-copy stage).
    keep: bool = False


class ExportSpec(msgspec.Struct, frozen=True):
    """Asks an instance to keep a finished request's KV for a later pull."""

    transfer_id: str


class TransferParams(msgspec.Struct, frozen=True, omit_defaults=True):
    """The ``kv_transfer_params["pdserve"]`` object."""

    export: ExportSpec | None = None
    source: SourceSpec | None = None
    # The gateway's id of the client request, used to find it again (e.g. for migration).
    request_key: str | None = None


def tokens_digest(token_ids: Sequence[int]) -> str:
    """A short digest of token ids, so an importer can check it has the same prefix."""
    data = json.dumps(list(token_ids), separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:24]


def parse_params(kv_transfer_params: Any) -> TransferParams | None:
    """Reads pdserve's part of a request's ``kv_transfer_params``; None if absent or invalid."""
    if not isinstance(kv_transfer_params, dict) or PARAMS_KEY not in kv_transfer_params:
        return None
    try:
        return msgspec.convert(kv_transfer_params[PARAMS_KEY], TransferParams)
    except msgspec.ValidationError:
        return None


def params_to_json(params: TransferParams) -> dict[str, Any]:
    return {PARAMS_KEY: msgspec.to_builtins(params)}


# --- outcomes -------------------------------------------------------------------------------


class KVFailure(enum.StrEnum):
    """Why a KV operation was refused or failed: the stable code of ``Failed`` and ``KVError``.

    The value is part of the wire protocol (and may appear in logs and metrics): never change
    one, only add new ones.
    """

    # A pull refused by the exporting worker.
    UNKNOWN_TRANSFER = "unknown_transfer"  # never registered here (within the pull's wait)
    ALREADY_PULLED = "already_pulled"  # its last pull has been served (or is being served)
    RELEASED = "released"  # the gateway or an importer released it
    LEASE_EXPIRED = "lease_expired"  # nobody pulled it within --kv-lease-s
    EXPORT_VOID = "export_void"  # a live export that was unpinned or preempted
    OUT_OF_RANGE = "out_of_range"  # the pull names blocks the export does not have
    # The pull relies on positions whose KV the exporter has not computed (yet): a live
    # export of a request still computing them, e.g. recomputing after a preemption.
    NOT_COMPUTED = "not_computed"
    UNKNOWN_PAIR = "unknown_pair"  # the pull names a pair this worker does not know
    BLOCKS_CHANGED = "blocks_changed"  # the exported blocks were freed during the read
    # Pair set-up between two workers.
    PROTOCOL_MISMATCH = "protocol_mismatch"  # the peers speak other PROTOCOL_VERSIONs
    PLANE_MISMATCH = "plane_mismatch"  # their plane digests differ (see the module docstring)
    PAIR_FAILED = "pair_failed"  # the process group of two did not form
    # Any KV exchange.
    TIMEOUT = "timeout"  # no answer, or the transfer, within its deadline
    TRANSPORT_ERROR = "transport_error"  # the connection failed (torch.distributed, ZeroMQ)
    # The peer's KV server answered no probe within --kv-pair-probe-timeout-s: it is gone
    # (its pairs are dropped here).
    PEER_GONE = "peer_gone"
    FAULTS_DISABLED = "faults_disabled"  # InjectFault without PDSERVE_FAULT_INJECTION=1
    UNEXPECTED_MESSAGE = "unexpected_message"
    # A source a decode instance does not trust (nothing is pulled; prefilled locally).
    BLOCK_SIZE_MISMATCH = "block_size_mismatch"
    CACHE_MISMATCH = "cache_mismatch"  # other cache fingerprint: model, dtype, TP or layout
    TP_MISMATCH = "tp_mismatch"
    TOKENS_MISMATCH = "tokens_mismatch"  # the source covers other tokens than the prompt
    # Engine control (migration: Pin, Unpin).
    UNKNOWN_REQUEST = "unknown_request"  # no request with that key on this engine
    REQUEST_WAITING = "request_waiting"  # still queued there: it holds no KV yet
    NOT_RUNNING = "not_running"  # preempted or finishing: nothing to export
    # Running, but its KV is not all there: recomputing its tokens after a preemption.
    RECOMPUTING = "recomputing"
    ALREADY_PINNED = "already_pinned"
    NOT_PINNED = "not_pinned"  # Unpin of a request that is not pinned (it has ended)


class KVError(Exception):
    """A KV operation failed in a known way; ``failure`` says which, the text says more."""

    def __init__(self, failure: KVFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure


class KVTimeout(KVError, TimeoutError):
    """A deadline of a KV exchange passed (also a ``TimeoutError``)."""

    def __init__(self, message: str) -> None:
        super().__init__(KVFailure.TIMEOUT, message)


def failure_of(error: BaseException) -> KVFailure:
    """The code of an exception raised by a KV operation; unknown errors are transport errors."""
    if isinstance(error, KVError):
        return error.failure
    if isinstance(error, TimeoutError):
        return KVFailure.TIMEOUT
    return KVFailure.TRANSPORT_ERROR


# --- worker-to-worker messages -------------------------------------------------------------


class PairOpen(msgspec.Struct, tag=True, frozen=True):
    """Initiator asks the KV server to form a process group of two (server is rank 0).

    The server refuses (``Failed``) a peer of another ``protocol`` (PROTOCOL_MISMATCH) or
    ``plane_digest`` (PLANE_MISMATCH). Both default so that a ``PairOpen`` of a peer from
    before versioning still decodes (as protocol 0) and gets a clear refusal.
    """

    rid: int
    pair_id: str
    backend: Literal["gloo", "nccl"]
    plane_digest: str = ""
    # The initiator's pdserve.kv.metadata.PROTOCOL_VERSION.
    protocol: int = 0
    # The initiator's own KV server (version 3): the server probes it to find out whether
    # the peer is still alive, and drops the peer's older pairs when it pairs again.
    address: str = ""
    # The random id of this start of the initiator (as in ``Pong``): a later answer with
    # another id means it restarted and this pair is stale.
    incarnation: str = ""


class PairOpened(msgspec.Struct, tag=True, frozen=True):
    """The server accepts the pair; the initiator checks the server's protocol version too."""

    rid: int
    protocol: int = 0
    incarnation: str = ""  # the server's start, as in ``Pong``


class PairClose(msgspec.Struct, tag=True, frozen=True):
    """The initiator tore a broken pair down (timeout, transport error): close it too.

    Refused pulls never close a pair. A worker that does not know the pair ignores it (and
    one from before this message drops it as undecodable, keeping the pair as it used to).
    """

    pair_id: str


class Ping(msgspec.Struct, tag=True, frozen=True):
    """Are you there? Answered with ``Pong`` on the KV server's I/O thread (version 3).

    A liveness probe: it never waits for a serving thread, so a busy exporter still answers
    at once, and a silent one is gone (``KVFailure.PEER_GONE``).
    """

    rid: int


class Pong(msgspec.Struct, tag=True, frozen=True):
    """``incarnation``: a random id of this start of the answering worker. A peer restarted on
    the same address answers with another one, so its pairs from before are found stale in
    seconds although the address answers (an empty id, from an older peer: not compared)."""

    rid: int
    incarnation: str = ""


def another_start(known: str, answered: str) -> bool:
    """Whether a peer known as start ``known`` now answers as another one (it restarted);
    an empty id on either side (unknown, or an older peer) is never another start."""
    return bool(known and answered) and known != answered


class StoreSet(msgspec.Struct, tag=True, frozen=True):
    """One key of the rendezvous store, mirrored to the other member of the pair."""

    pair_id: str
    key: str
    value: bytes


class PullRequest(msgspec.Struct, tag=True, frozen=True):
    """Initiator asks for blocks of an export to be sent over the pair."""

    rid: int
    transfer_id: str
    pair_id: str
    seq: int
    # Blocks first, first + 1, ... of the export go to these blocks of the initiator.
    first: int
    dst: list[int]
    # Wait this long for the export to be registered (it may still be on its way).
    wait_s: float = 5.0
    # The export is finished (its blocks freed) once this pull is done.
    last: bool = True
    # The initiator's transfer mode: never, auto or always gather blocks into few messages.
    staging: Literal["never", "auto", "always"] = "never"
    # The initiator relies on the KV of the export's first ``needs_tokens`` positions; the
    # exporter refuses (NOT_COMPUTED) if it has computed fewer (version 3; 0: no check).
    needs_tokens: int = 0


class PullStarted(msgspec.Struct, tag=True, frozen=True):
    """The server is about to send these physical blocks; the initiator posts its receives."""

    rid: int
    src: list[int]
    # Whether the blocks come gathered into few messages (the server decides, see staging).
    staged: bool = False


class PullFinished(msgspec.Struct, tag=True, frozen=True):
    """All sends completed; ``valid`` is False if the blocks changed under the read."""

    rid: int
    valid: bool


class Failed(msgspec.Struct, tag=True, frozen=True):
    """A request was refused or failed: ``code`` to branch on, ``error`` for logs."""

    rid: int
    code: KVFailure
    error: str


class Release(msgspec.Struct, tag=True, frozen=True):
    """Nobody will pull this export: free its blocks now (idempotent)."""

    transfer_id: str


class InjectFault(msgspec.Struct, tag=True, frozen=True):
    """Test hook: delay the next ``count`` pulls served here by ``delay_s`` after they start.

    Refused unless the instance runs with PDSERVE_FAULT_INJECTION=1.
    """

    rid: int
    delay_s: float
    count: int = 1


class Ack(msgspec.Struct, tag=True, frozen=True):
    rid: int


# --- engine control (gateway -> the scheduler side of an instance), for migration -----------


class Pin(msgspec.Struct, tag=True, frozen=True):
    """Export a running request's KV while it keeps decoding (a *live* export).

    Its blocks can then be pulled as they fill; when the request ends (the gateway cuts its
    stream to move it), its blocks are kept for a last pull instead of being freed.
    """

    rid: int
    request_key: str
    transfer_id: str


class Pinned(msgspec.Struct, tag=True, frozen=True):
    """The request is pinned; every token but its last sampled one has its KV there.

    A request whose KV is not all there (recomputing after a preemption) is refused with
    ``KVFailure.RECOMPUTING`` instead, and pulls of a live export are refused
    (``NOT_COMPUTED``) beyond what the request has computed.
    """

    rid: int
    num_computed_tokens: int
    block_size: int
    bytes_per_block: int
    cache_fingerprint: str
    addresses: list[str]
    instance_id: str


class Unpin(msgspec.Struct, tag=True, frozen=True):
    """The migration was abandoned before the cut: stop exporting (nothing is freed)."""

    rid: int
    transfer_id: str


KVMessage = (
    PairOpen
    | PairOpened
    | PairClose
    | Ping
    | Pong
    | StoreSet
    | PullRequest
    | PullStarted
    | PullFinished
    | Failed
    | Release
    | InjectFault
    | Ack
    | Pin
    | Pinned
    | Unpin
)
