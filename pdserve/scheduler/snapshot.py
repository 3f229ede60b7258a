"""The cluster as the policies see it: immutable, complete, and free of I/O.

The gateway builds a ``ClusterSnapshot`` from the latest load reports plus what it has sent
since (``Pending``: dispatches the next report may not reflect yet, so that a burst of
requests does not all land on the instance that looked best a moment ago).

Policies pick instances from *pools* (the usable decode-capable instances, the usable
prefill instances, and ``any``: every usable instance, whatever its role, since roles are
preferences and any instance can serve a whole request) by a ``Ranking``:
``snapshot.best(ranking)`` is the pool's instance with the lowest key, the earliest in the
snapshot on a tie, exactly ``min(pool, key=key)``. A
snapshot made by the gateway carries an index (``pdserve.scheduler.index``) that the control
plane keeps up to date as reports come, so that answer costs O(log n), not a scan of every
instance at every decision; a snapshot built by hand (tests) computes it by scanning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pdserve.protocol.net import cdiv
from pdserve.protocol.reports import LoadReport, Role

PoolName = Literal["decode", "prefill", "any"]
POOLS: tuple[PoolName, ...] = ("decode", "prefill", "any")


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

    @classmethod
    def of(
        cls,
        instance_id: str,
        role: Role,
        healthy: bool,
        accepting: bool,
        load: LoadReport | None,
        pending: Pending,
        max_model_len: int,
    ) -> InstanceView:
        """The same view as the constructor, made without a frozen dataclass's
        ``object.__setattr__`` per field: the control plane makes one at every report."""
        view = object.__new__(cls)
        view.__dict__.update(
            instance_id=instance_id,
            role=role,
            healthy=healthy,
            accepting=accepting,
            load=load,
            pending=pending,
            max_model_len=max_model_len,
        )
        return view

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


def in_pool(view: InstanceView, pool: PoolName) -> bool:
    """``decode``: usable and decode-capable; ``prefill``: usable with the prefill role
    (a ``both`` instance prefills only the requests it decodes); ``any``: usable (every
    instance runs the same KV connector and can serve a whole request)."""
    if not view.usable:
        return False
    if pool == "decode":
        return view.can_decode
    return pool == "any" or view.role == "prefill"


@dataclass(frozen=True, eq=False)
class Ranking:
    """How a policy picks from a pool: the lowest ``key`` (a pure function of the view).

    A policy makes its rankings once and reuses them: the index keeps one sorted order per
    ranking object.
    """

    pool: PoolName
    key: Callable[[InstanceView], Any]


class SnapshotIndex(Protocol):
    """Precomputed answers for one snapshot. ``views`` always answers (the views as of the
    snapshot, by id, in order); the others raise ``LookupError`` when they cannot (the
    snapshot then computes the answer from its views)."""

    def views(self) -> Mapping[str, InstanceView]: ...

    def pool(self, name: PoolName) -> tuple[InstanceView, ...]: ...

    def best(self, ranking: Ranking) -> InstanceView | None: ...

    def ids(self, name: PoolName) -> tuple[str, ...]: ...


class ClusterSnapshot:
    """Every instance's view at one moment: an immutable value.

    ``ClusterSnapshot(views)``; the gateway's come with an index instead
    (``ClusterSnapshot.indexed``), whose ``instances`` tuple is only made if asked for.
    """

    __slots__ = ("__weakref__", "_cache", "_index", "_instances")
    _instances: tuple[InstanceView, ...] | None
    _index: SnapshotIndex | None
    _cache: dict[str, Any]

    def __init__(self, instances: Iterable[InstanceView] = ()) -> None:
        object.__setattr__(self, "_instances", tuple(instances))
        object.__setattr__(self, "_index", None)
        object.__setattr__(self, "_cache", {})

    @classmethod
    def indexed(cls, index: SnapshotIndex) -> ClusterSnapshot:
        snapshot = cls.__new__(cls)
        object.__setattr__(snapshot, "_instances", None)
        object.__setattr__(snapshot, "_index", index)
        object.__setattr__(snapshot, "_cache", {})
        return snapshot

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a ClusterSnapshot is immutable ({name})")

    @property
    def instances(self) -> tuple[InstanceView, ...]:
        instances: tuple[InstanceView, ...] | None = self._instances
        if instances is None:
            assert self._index is not None
            instances = tuple(self._index.views().values())
            object.__setattr__(self, "_instances", instances)
        return instances

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClusterSnapshot):
            return NotImplemented
        return self.instances == other.instances

    def __hash__(self) -> int:
        return hash(self.instances)

    def __repr__(self) -> str:
        return f"ClusterSnapshot({self.instances!r})"

    def usable(self) -> list[InstanceView]:
        return [i for i in self.instances if i.usable]

    def pool(self, name: PoolName) -> tuple[InstanceView, ...]:
        """The pool's instances, in the snapshot's order."""
        if self._index is not None:
            try:
                return self._index.pool(name)
            except LookupError:
                pass
        found: tuple[InstanceView, ...] | None = self._cache.get(name)
        if found is None:
            found = self._cache[name] = tuple(v for v in self.instances if in_pool(v, name))
        return found

    def ids(self, name: PoolName) -> tuple[str, ...]:
        """The ids of the pool's instances, sorted."""
        if self._index is not None:
            try:
                return self._index.ids(name)
            except LookupError:
                pass
        return tuple(sorted(v.instance_id for v in self.pool(name)))

    def best(self, ranking: Ranking) -> InstanceView | None:
        """``min(self.pool(ranking.pool), key=ranking.key)``; None for an empty pool."""
        if self._index is not None:
            try:
                return self._index.best(ranking)
            except LookupError:
                pass
        return min(self.pool(ranking.pool), key=ranking.key, default=None)

    def get(self, instance_id: str) -> InstanceView | None:
        if self._index is not None:
            return self._index.views().get(instance_id)
        by_id: dict[str, InstanceView] | None = self._cache.get("by id")
        if by_id is None:
            by_id = self._cache["by id"] = {}
            for view in self.instances:
                by_id.setdefault(view.instance_id, view)
        return by_id.get(instance_id)


@dataclass(frozen=True)
class RequestEstimate:
    """What the gateway knows of a request before any instance has seen it."""

    prompt_tokens: int
    max_tokens: int
    # Higher is more important (vLLM's ``priority`` field has lower-is-first; the gateway
    # turns it around so that 0 is normal and a policy can say ``priority > 0``).
    priority: int = 0
    # The request's own SLOs (``x-slo-ttft-ms`` / ``x-slo-tpot-ms``); None: the cluster's.
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    # The prompt's token ids where the gateway knows them (exact tokenization, token-id
    # prompts, later legs): the prefix index matches them (``scheduler.prefix_index``).
    # Not compared: two estimates of the same sizes are the same to every policy.
    prompt_token_ids: tuple[int, ...] | None = field(default=None, repr=False, compare=False)

    def prompt_blocks(self, block_size: int) -> int:
        """Blocks the request holds once admitted (its output grows them later)."""
        return cdiv(self.prompt_tokens + 1, block_size)
