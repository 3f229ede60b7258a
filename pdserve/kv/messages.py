"""KV-control messages between workers (and from the gateway), and the transfer parameters.

Two kinds of data cross instance boundaries:

- ``kv_transfer_params`` travel inside OpenAI requests and responses (JSON). Under the key
  ``"pdserve"`` they say what an instance should export (``ExportSpec``) or import
  (``SourceSpec``, as returned by the exporting instance).
- Worker-to-worker messages travel over ZeroMQ in the authenticated envelope of
  ``pdserve.protocol.wire``: pair set-up (the rendezvous of a torch.distributed process group
  of two), pulls, and releases.

This module imports no torch, so the gateway can use it.
"""

from __future__ import annotations

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
    layout: str
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


# --- worker-to-worker messages -------------------------------------------------------------


class PairOpen(msgspec.Struct, tag=True, frozen=True):
    """Initiator asks the KV server to form a process group of two (server is rank 0)."""

    rid: int
    pair_id: str
    backend: Literal["gloo", "nccl"]
    layout: str


class PairOpened(msgspec.Struct, tag=True, frozen=True):
    rid: int


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
    rid: int
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
    rid: int
    num_computed_tokens: int
    block_size: int
    bytes_per_block: int
    layout: str
    addresses: list[str]
    instance_id: str


class Unpin(msgspec.Struct, tag=True, frozen=True):
    """The migration was abandoned before the cut: stop exporting (nothing is freed)."""

    rid: int
    transfer_id: str


KVMessage = (
    PairOpen
    | PairOpened
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
