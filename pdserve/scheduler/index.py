"""The cluster's views kept ready for decisions, updated one instance at a time.

The control plane owns a ``ClusterIndex`` and tells it each instance's view when that view
changes (a load report, a dispatch, health); ``snapshot()`` hands out an immutable
``ClusterSnapshot`` that answers ``pool``, ``best``, ``ids`` and ``get`` from the index
instead of scanning every instance, so a decision costs about the same at 16 or 1,024
instances:

- the views by id, in the cluster's order (an instance keeps its position while it stays,
  a new one comes last). A snapshot shares that dict instead of copying it; the index copies
  it before its next change only while a snapshot that shares it is still alive
  (copy-on-write), so a snapshot that lives on keeps the views it was made with;
- per pool, its members in that order (re-sorted only when membership changes) and their
  sorted ids;
- per ``Ranking`` asked for, a heap of ``(key, position, stamp, id)``: ``best`` is its top,
  once the entries of replaced views (an older stamp) above it are dropped. An update is
  one push, O(log n), or none when the view's key did not change (its entry stays the live
  one: same key, same position); ``tidy()`` drops the stale entries of a heap once they
  outnumber the live ones (the control plane calls it while handling load reports, off the
  decisions' path; ``set`` does it itself only far later). Ties go to the earliest position, as
  ``min`` over the pool.

``pool``, ``best`` and ``ids`` answer only while the index is at the snapshot's version; an
older snapshot computes them from its own views (``LookupError`` from here). Everything
here is pure (no I/O), like the policies.
"""

from __future__ import annotations

import heapq
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from pdserve.scheduler.snapshot import (
    POOLS,
    ClusterSnapshot,
    InstanceView,
    PoolName,
    Ranking,
)

# Rankings kept at once; a policy that asks for more gets scans for the others.
MAX_RANKINGS = 8
# A heap is tidied when its stale entries outnumber the live ones (``tidy``), and by
# ``set`` itself past this many times its pool.
_TIDY_AT, _FORCE_AT = 2, 8
_Entry = tuple[Any, int, int, str]  # (key, position, stamp, instance id)
# The pools of a view, by (usable, role): ``in_pool`` for every pool (a unit test checks).
_POOLS_OF: dict[tuple[bool, str], tuple[PoolName, ...]] = {
    (True, "decode"): ("decode", "any"),
    (True, "both"): ("decode", "any"),
    (True, "prefill"): ("prefill", "any"),
    (False, "decode"): (),
    (False, "both"): (),
    (False, "prefill"): (),
}


class _Pool:
    __slots__ = ("ids_tuple", "members", "members_tuple", "ordered")

    def __init__(self) -> None:
        self.members: dict[str, InstanceView] = {}
        self.ordered = True  # members are in position order
        self.members_tuple: tuple[InstanceView, ...] | None = None
        self.ids_tuple: tuple[str, ...] | None = None


class _Ranked:
    """One ranking's heap over its pool (with stale entries, see the module doc)."""

    __slots__ = ("heap", "key", "keys", "pool", "stamps")

    def __init__(self, key: Callable[[InstanceView], Any], pool: _Pool) -> None:
        self.key = key
        self.pool = pool
        self.heap: list[_Entry] = []
        # Each member's live entry: its key and stamp (an entry with another stamp is stale).
        self.keys: dict[str, Any] = {}
        self.stamps: dict[str, int] = {}

    def forget(self, instance_id: str) -> None:
        self.keys.pop(instance_id, None)
        self.stamps.pop(instance_id, None)


class ClusterIndex:
    def __init__(self) -> None:
        self._views: dict[str, InstanceView] = {}
        self._shared: weakref.ref[_Frozen] | None = None  # who shares ``_views``
        self._position: dict[str, int] = {}
        self._next_position = 0
        self._stamp: dict[str, int] = {}
        self._next_stamp = 0
        self._in: dict[str, tuple[PoolName, ...]] = {}  # the pools each instance is in
        self._pools: dict[PoolName, _Pool] = {name: _Pool() for name in POOLS}
        self._ranked: dict[Ranking, _Ranked] = {}
        self._ranked_in: dict[PoolName, list[_Ranked]] = {name: [] for name in POOLS}
        self.version = 0
        self._snapshot: weakref.ref[ClusterSnapshot] | None = None

    def __len__(self) -> int:
        return len(self._views)

    # --- updates ------------------------------------------------------------------------------

    def set(self, instance_id: str, view: InstanceView) -> None:
        """The instance's current view (a new instance goes last)."""
        views = self._views
        if views.get(instance_id) is view:
            return
        views = self._changing()
        position = self._position.get(instance_id)
        if position is None:
            position = self._position[instance_id] = self._next_position
            self._next_position += 1
        views[instance_id] = view
        self._next_stamp += 1
        stamp = self._stamp[instance_id] = self._next_stamp
        pools = _POOLS_OF[view.usable, view.role]
        if self._in.get(instance_id) is not pools:  # membership changes: rare
            self._in[instance_id] = pools
            for name, pool in self._pools.items():
                if name not in pools and pool.members.pop(instance_id, None) is not None:
                    pool.members_tuple = pool.ids_tuple = None
                    for ranked in self._ranked_in[name]:
                        ranked.forget(instance_id)
                elif name in pools and instance_id not in pool.members:
                    pool.ordered = False
                    pool.ids_tuple = None
        for name in pools:
            member_of = self._pools[name]
            members = member_of.members
            members[instance_id] = view
            member_of.members_tuple = None
            for ranked in self._ranked_in[name]:
                key = ranked.key(view)
                keys = ranked.keys
                if instance_id in keys and keys[instance_id] == key:
                    continue  # its live entry stays right: same key, same position
                keys[instance_id] = key
                ranked.stamps[instance_id] = stamp
                heap = ranked.heap
                heapq.heappush(heap, (key, position, stamp, instance_id))
                if len(heap) > _FORCE_AT * len(members) + 64:
                    self._tidy(ranked)

    def remove(self, instance_id: str) -> None:
        if instance_id not in self._views:
            return
        del self._changing()[instance_id]
        del self._position[instance_id]
        del self._stamp[instance_id]
        self._in.pop(instance_id, None)
        for pool in self._pools.values():
            if pool.members.pop(instance_id, None) is not None:
                pool.members_tuple = pool.ids_tuple = None
        for ranked in self._ranked.values():
            ranked.forget(instance_id)

    def tidy(self) -> None:
        """Drops the stale entries of the heaps where they outnumber the live ones."""
        for ranked in self._ranked.values():
            if len(ranked.heap) > _TIDY_AT * len(ranked.pool.members) + 64:
                self._tidy(ranked)

    def _tidy(self, ranked: _Ranked) -> None:
        heap, stamps = ranked.heap, ranked.stamps
        heap[:] = [entry for entry in heap if stamps.get(entry[3]) == entry[2]]
        heapq.heapify(heap)

    def _changing(self) -> dict[str, InstanceView]:
        """The views, about to change: copied first if a live snapshot shares them."""
        self.version += 1
        self._snapshot = None
        shared = self._shared
        if shared is not None:
            self._shared = None
            if shared() is not None:
                self._views = dict(self._views)
        return self._views

    # --- answers ------------------------------------------------------------------------------

    def snapshot(self) -> ClusterSnapshot:
        """The snapshot of the current views (the same object until a view changes)."""
        ref = self._snapshot
        snapshot = ref() if ref is not None else None
        if snapshot is None:
            frozen = _Frozen(self, self.version, self._views)
            self._shared = weakref.ref(frozen)
            snapshot = ClusterSnapshot.indexed(frozen)
            self._snapshot = weakref.ref(snapshot)
        return snapshot

    def pool(self, name: PoolName) -> tuple[InstanceView, ...]:
        pool = self._pools[name]
        if pool.members_tuple is None:
            if not pool.ordered:
                position = self._position
                items = sorted(pool.members.items(), key=lambda item: position[item[0]])
                pool.members = dict(items)
                pool.ordered = True
            pool.members_tuple = tuple(pool.members.values())
        return pool.members_tuple

    def ids(self, name: PoolName) -> tuple[str, ...]:
        pool = self._pools[name]
        if pool.ids_tuple is None:
            pool.ids_tuple = tuple(sorted(pool.members))
        return pool.ids_tuple

    def best(self, ranking: Ranking) -> InstanceView | None:
        ranked = self._ranked.get(ranking)
        if ranked is None:
            if len(self._ranked) >= MAX_RANKINGS:
                raise LookupError("too many rankings")
            pool = self._pools[ranking.pool]
            ranked = self._ranked[ranking] = _Ranked(ranking.key, pool)
            self._ranked_in[ranking.pool].append(ranked)
            positions, stamps, key = self._position, self._stamp, ranking.key
            ranked.heap = [(key(v), positions[i], stamps[i], i) for i, v in pool.members.items()]
            heapq.heapify(ranked.heap)
            ranked.keys = {entry[3]: entry[0] for entry in ranked.heap}
            ranked.stamps = {entry[3]: entry[2] for entry in ranked.heap}
        heap, stamps = ranked.heap, ranked.stamps
        while heap:
            _, _, stamp, instance_id = heap[0]
            if stamps.get(instance_id) == stamp:
                return self._views[instance_id]
            heapq.heappop(heap)
        return None


class _Frozen:
    """The index as one snapshot sees it: its views always, the rest while nothing changed."""

    __slots__ = ("__weakref__", "_index", "_version", "_views")

    def __init__(self, index: ClusterIndex, version: int, views: dict[str, InstanceView]) -> None:
        self._index = index
        self._version = version
        self._views = views

    def _current(self) -> ClusterIndex:
        if self._index.version != self._version:
            raise LookupError("the cluster changed since this snapshot")
        return self._index

    def views(self) -> Mapping[str, InstanceView]:
        return self._views

    def pool(self, name: PoolName) -> tuple[InstanceView, ...]:
        return self._current().pool(name)

    def ids(self, name: PoolName) -> tuple[str, ...]:
        return self._current().ids(name)

    def best(self, ranking: Ranking) -> InstanceView | None:
        return self._current().best(ranking)
