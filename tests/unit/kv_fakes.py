"""Minimal stand-ins for the vLLM objects the connector's scheduler side reads.

vLLM tests its connectors with fake requests in the same way; these carry only the
attributes ``pdserve.kv.scheduler_side`` and ``pdserve.kv.connector`` use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from vllm.v1.request import RequestStatus

from pdserve.kv.messages import (
    ExportSpec,
    SourceSpec,
    TransferParams,
    params_to_json,
    tokens_digest,
)

BLOCK_SIZE = 4
PORT = 7100


def kv_cache_config(block_size: int = BLOCK_SIZE, head_size: int = 8) -> Any:
    spec = SimpleNamespace(
        block_size=block_size,
        num_kv_heads=2,
        head_size=head_size,
        dtype="torch.float32",
        page_size_bytes=2 * 2 * block_size * head_size * 4,
    )
    group = SimpleNamespace(kv_cache_spec=spec, layer_names=["layers.0", "layers.1"])
    return SimpleNamespace(kv_cache_groups=[group], kv_cache_layout="NHD")


def vllm_config(tp_size: int = 1, extra: dict[str, Any] | None = None) -> Any:
    return SimpleNamespace(
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=tp_size),
        kv_transfer_config=SimpleNamespace(
            kv_connector_extra_config=extra or {"pdserve": {"port": PORT, "lease_s": 30}}
        ),
        cache_config=SimpleNamespace(num_gpu_blocks=64),
    )


@dataclass
class FakeRequest:
    request_id: str
    all_token_ids: list[int]
    kv_transfer_params: dict[str, Any] | None = None
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


@dataclass
class FakeBlocks:
    """``KVCacheBlocks`` of the one cache group."""

    block_ids: list[int]

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (self.block_ids,)


@dataclass
class FakeCacheManager:
    blocks: dict[str, list[int]] = field(default_factory=dict)
    block_pool: object = None

    def get_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        return (self.blocks[request_id],)


@dataclass
class FakeSchedulerOutput:
    preempted_req_ids: set[str] = field(default_factory=set)


class FakeControl:
    """Records the engine control server's replies instead of sending them."""

    def __init__(self) -> None:
        self.replies: list[tuple[bytes, Any]] = []

    def reply(self, identity: bytes, message: Any) -> None:
        self.replies.append((identity, message))

    def stop(self) -> None:
        pass


def prefill_request(request_id: str, tokens: list[int], transfer_id: str) -> FakeRequest:
    params = params_to_json(TransferParams(export=ExportSpec(transfer_id=transfer_id)))
    return FakeRequest(request_id, tokens, params)


def source_for(
    tokens: list[int],
    cache_fingerprint: str,
    transfer_id: str = "t1",
    block_size: int = BLOCK_SIZE,
    addresses: list[str] | None = None,
    keep: bool = False,
) -> SourceSpec:
    """What a prefill instance returns for ``tokens`` (all of them computed there)."""
    return SourceSpec(
        transfer_id=transfer_id,
        instance_id="prefill-0",
        addresses=addresses or ["tcp://10.0.0.1:7100"],
        num_tokens=len(tokens),
        block_size=block_size,
        cache_fingerprint=cache_fingerprint,
        tokens_digest=tokens_digest(tokens),
        keep=keep,
    )


def decode_request(
    request_id: str, tokens: list[int], source: SourceSpec, request_key: str | None = None
) -> FakeRequest:
    params = params_to_json(TransferParams(source=source, request_key=request_key))
    return FakeRequest(request_id, tokens, params)
