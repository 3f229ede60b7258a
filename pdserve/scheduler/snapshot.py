"""The cluster as the policies see it: immutable, complete, and free of I/O.

The gateway builds a ``ClusterSnapshot`` from the latest load reports plus what it has sent
since (``Pending``: dispatches the next report may not reflect yet, so that a burst of
requests does not all land on the instance that looked best a moment ago).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.protocol.net import cdiv
from pdserve.protocol.reports import LoadReport, Role


@dataclass(frozen=True)
class Pending:
    """Work sent to an instance that its last load report does not show yet."""

    requests: int = 0
    prompt_tokens: int = 0
    blocks: int = 0

    def __add__(self, other: Pending) -> Pending:
        return Pending(
            self.requests + other.requests,
            self.prompt_tokens + other.prompt_tokens,
            self.blocks + other.blocks,
        )


@dataclass(frozen=True)
class InstanceView:
    instance_id: str
    role: Role
    healthy: bool = True
    # False while draining: no new work is sent to it.
    accepting: bool = True
    load: LoadReport | None = None
    pending: Pending = field(default_factory=Pending)
    max_model_len: int = 0

    @property
    def usable(self) -> bool:
        return self.healthy and self.accepting and self.load is not None

    @property
    def can_prefill(self) -> bool:
        return self.role in ("prefill", "both")

    @property
    def can_decode(self) -> bool:
        return self.role in ("decode", "both")

    @property
    def block_size(self) -> int:
        return self.load.block_size if self.load else 16

    @property
    def num_requests(self) -> int:
        load = self.load
        current = load.num_running + load.num_waiting if load else 0
        return current + self.pending.requests

    def queued_prompt_tokens(self) -> int:
        return (self.load.waiting_prompt_tokens if self.load else 0) + self.pending.prompt_tokens

    def virtual_free_blocks(self, watermark: float) -> int:
        """Llumnix's virtual usage turned around: blocks left after the queued demand."""
        if self.load is None:
            return 0
        reserve = int(watermark * self.load.total_blocks)
        return self.load.free_blocks - reserve - self.load.waiting_blocks - self.pending.blocks

    def freeness(self, watermark: float) -> float:
        """Virtual free blocks per request (one more: the request being placed)."""
        return self.virtual_free_blocks(watermark) / (self.num_requests + 1)


@dataclass(frozen=True)
class ClusterSnapshot:
    instances: tuple[InstanceView, ...]

    def usable(self) -> list[InstanceView]:
        return [i for i in self.instances if i.usable]

    def get(self, instance_id: str) -> InstanceView | None:
        for view in self.instances:
            if view.instance_id == instance_id:
                return view
        return None


@dataclass(frozen=True)
class RequestEstimate:
    """What the gateway knows of a request before any instance has seen it."""

    prompt_tokens: int
    max_tokens: int

    def prompt_blocks(self, block_size: int) -> int:
        """Blocks the request holds once admitted (its output grows them later)."""
        return cdiv(self.prompt_tokens + 1, block_size)
