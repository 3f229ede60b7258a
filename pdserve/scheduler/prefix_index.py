"""Which instance holds which prompt prefix in its prefix cache: pure, bounded, O(prompt blocks).

The gateway's control plane owns one ``PrefixIndex`` (through
``pdserve.gateway.prefix_events``) and the cache-aware policy reads it
(``pdserve.scheduler.cache_aware``). Blocks are named by chain keys computed from token ids
(``pdserve.protocol.prefix``: key(block i) = H(key(block i-1), its token ids)), never by
vLLM's own hashes, which depend on a per-process seed; each instance's vLLM hash → key map
is kept so that vLLM's removals can be applied.

Two ways an instance's entries are known, and ``PrefixMatch.approximate`` says which:

- ``Tracking.EXACT``: from the instance's own KV events (vLLM's ``BlockStored`` /
  ``BlockRemoved`` / ``AllBlocksCleared``, relayed by the instance). An instance becomes
  exact at its first event and stays so until ``forget``.
- ``Tracking.APPROXIMATE``: for an instance that sends no events, what the gateway routed
  there (``routed``: the prompt's blocks as if cached there), least recently routed dropped
  first beyond its capacity, and aged out after ``approximate_ttl_s``, as vllm-router's
  approximate tree does. It can claim blocks vLLM has evicted already, or miss ones it
  kept.

The API (the gateway and the simulator call the same methods; times are the caller's clock):

- ``stored(instance, block_hashes, parent_block_hash, token_ids, block_size)``: one
  ``BlockStored`` as vLLM publishes it (hashes as vLLM's ints or bytes, or any int naming the
  block uniquely on that instance); the keys are computed from the token ids and the
  parent's key. A run whose parent is unknown (its prefix was never seen, or is gone) is
  skipped, as vLLM could not hit it either.
- ``stored_keys(instance, block_hashes, keys, block_size)``: the same with the keys already
  computed (what the instances' relays send: ``pdserve.protocol.prefix.PrefixEvents``).
- ``removed(instance, block_hashes)``, ``cleared(instance)`` (the cache emptied, or a gap in
  its events: it stays exact and fills again from the events that follow), ``forget(instance)``
  (left or restarted: nothing of it remains, exact or approximate).
- ``routed(instance, keys, block_size, now, capacity=None)``: an approximate record (ignored
  for an exact instance); ``capacity``: the instance's KV blocks, the most it keeps.
- ``match(token_ids, block_size, now)`` / ``match_keys(keys, block_size, now)``:
  ``PrefixMatch``, a mapping instance id → prompt tokens cached there (a multiple of the
  block size; 0 or absent: none), only counting the leading blocks vLLM can hit (the last
  prompt token is always computed: ``pdserve.protocol.prefix.prompt_keys``) and only
  instances of that block size.

An instance's block size is the largest block any of its events carries: vLLM's partial
prefix entries (hybrid models, a prompt's tail inside a block) are smaller and are not
indexed.

A simulator has no token ids: it can give each block of a named run synthetic ids (any
deterministic ``block_size`` ints of the run's name and the block's position) and then feed
``stored`` from its block pool's caching and evictions, and ask ``match`` with the same ids.

Memory is bounded: per exact instance ``max_blocks`` entries (the oldest stored are dropped
beyond it, so a lost removal cannot grow it), per approximate instance its capacity (else
``approximate_max_blocks``), and ``max_instances`` instances. Matching walks the prompt's
keys once, over the instances still matching: O(prompt blocks × holders of its prefix).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from pdserve.protocol.prefix import BlockKeys, external_hash, prompt_keys

DEFAULT_MAX_BLOCKS = 1 << 21
DEFAULT_APPROXIMATE_MAX_BLOCKS = 1 << 16
DEFAULT_APPROXIMATE_TTL_S = 120.0
DEFAULT_MAX_INSTANCES = 4096


@dataclass(frozen=True)
class PrefixTracking:
    """How the control plane keeps the index a policy reads
    (``gateway.prefix_events.PrefixRouting``): ``kv_events`` False ignores the instances' events
    and tracks every instance approximately (vllm-router's way); a routed prompt is remembered
    ``approximate_ttl_s``, at most ``approximate_max_blocks`` blocks per instance, and at most
    its KV cache's blocks where ``bounded_by_capacity``."""

    kv_events: bool
    approximate_ttl_s: float
    approximate_max_blocks: int
    bounded_by_capacity: bool


class Tracking(enum.StrEnum):
    EXACT = "exact"  # the instance's own KV events
    APPROXIMATE = "approximate"  # what the gateway routed there, aged out


@dataclass(frozen=True)
class PrefixMatch(Mapping[str, int]):
    """Prompt tokens cached per instance (absent: none), and which of those are guesses."""

    cached: Mapping[str, int] = field(default_factory=dict)
    approximate: frozenset[str] = frozenset()
    block_size: int = 0

    def __getitem__(self, instance_id: str) -> int:
        return self.cached[instance_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self.cached)

    def __len__(self) -> int:
        return len(self.cached)

    def tokens(self, instance_id: str) -> int:
        """Cached prompt tokens on the instance (0: none, or not matched)."""
        return self.cached.get(instance_id, 0)


NO_MATCH = PrefixMatch()


class _Exact:
    """An instance that sends KV events: its hash → key map and how often it holds a key."""

    tracking = Tracking.EXACT
    __slots__ = ("block_size", "blocks", "counts")

    def __init__(self, max_blocks: int) -> None:
        self.blocks = BlockKeys(max_blocks)
        self.counts: dict[int, int] = {}
        self.block_size = 0

    def holds(self, key: int, now: float) -> bool:
        return key in self.counts


class _Approximate:
    """An instance without events: the keys routed there, least recently routed first."""

    tracking = Tracking.APPROXIMATE
    __slots__ = ("block_size", "touched", "ttl_s")

    def __init__(self, ttl_s: float) -> None:
        self.touched: OrderedDict[int, float] = OrderedDict()
        self.block_size = 0
        self.ttl_s = ttl_s

    def holds(self, key: int, now: float) -> bool:
        at = self.touched.get(key)
        return at is not None and now - at <= self.ttl_s


class PrefixIndex:
    """The index of the module docstring."""

    def __init__(
        self,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        approximate_max_blocks: int = DEFAULT_APPROXIMATE_MAX_BLOCKS,
        approximate_ttl_s: float = DEFAULT_APPROXIMATE_TTL_S,
        max_instances: int = DEFAULT_MAX_INSTANCES,
    ) -> None:
        self.max_blocks = max_blocks
        self.approximate_max_blocks = approximate_max_blocks
        self.approximate_ttl_s = approximate_ttl_s
        self.max_instances = max_instances
        self._instances: dict[str, _Exact | _Approximate] = {}
        self._holders: dict[int, set[str]] = {}  # key -> instances holding it

    def __len__(self) -> int:
        """Distinct keys held anywhere (exact or approximate, aged or not)."""
        return len(self._holders)

    def tracking(self, instance_id: str) -> Tracking | None:
        entry = self._instances.get(instance_id)
        return None if entry is None else entry.tracking

    def blocks(self, instance_id: str) -> int:
        """Entries kept for the instance."""
        entry = self._instances.get(instance_id)
        if isinstance(entry, _Exact):
            return len(entry.counts)
        return len(entry.touched) if entry is not None else 0

    def block_sizes(self) -> set[int]:
        """The block sizes of the instances with entries (usually one)."""
        return {e.block_size for e in self._instances.values() if e.block_size}

    # --- exact: KV events ---------------------------------------------------------------------

    def stored(
        self,
        instance_id: str,
        block_hashes: Sequence[int | bytes],
        parent_block_hash: int | bytes | None,
        token_ids: Sequence[int],
        block_size: int,
    ) -> int:
        """One ``BlockStored``; returns the blocks indexed (0: skipped, see the module doc)."""
        entry = self._exact(instance_id, block_size)
        if entry is None:
            return 0
        hashes = [external_hash(h) for h in block_hashes]
        parent = None if parent_block_hash is None else external_hash(parent_block_hash)
        keys = entry.blocks.resolve(hashes, parent, token_ids, block_size)
        if keys is None:
            return 0
        self._add(instance_id, entry, hashes, keys)
        return len(keys)

    def stored_keys(
        self,
        instance_id: str,
        block_hashes: Sequence[int],
        keys: Sequence[int],
        block_size: int,
    ) -> int:
        """Blocks stored, their keys computed by the sender; returns the blocks indexed."""
        entry = self._exact(instance_id, block_size)
        if entry is None or len(block_hashes) != len(keys):
            return 0
        self._add(instance_id, entry, block_hashes, keys)
        return len(keys)

    def removed(self, instance_id: str, block_hashes: Sequence[int | bytes]) -> None:
        entry = self._instances.get(instance_id)
        if not isinstance(entry, _Exact):
            return
        hashes = [external_hash(h) for h in block_hashes]
        for key in entry.blocks.remove(hashes):
            self._release(instance_id, entry, key)

    def cleared(self, instance_id: str) -> None:
        """The instance's cache is empty (or its events had a gap): it stays exact."""
        entry = self._instances.get(instance_id)
        if isinstance(entry, _Exact):
            self._drop_keys(instance_id, entry.counts)
            entry.counts = {}
            entry.blocks.clear()
        elif entry is not None:
            self.forget(instance_id)
            self._exact(instance_id, 0)

    def forget(self, instance_id: str) -> None:
        """Nothing of the instance remains (it left, or restarted with an empty cache)."""
        entry = self._instances.pop(instance_id, None)
        if isinstance(entry, _Exact):
            self._drop_keys(instance_id, entry.counts)
        elif entry is not None:
            self._drop_keys(instance_id, entry.touched)

    def _exact(self, instance_id: str, block_size: int) -> _Exact | None:
        """The instance's exact entry, made (dropping approximate entries) or re-made for a
        larger block size; None for a smaller block size, or past ``max_instances``."""
        entry = self._instances.get(instance_id)
        if not isinstance(entry, _Exact):
            if entry is None and len(self._instances) >= self.max_instances:
                return None
            self.forget(instance_id)
            entry = self._instances[instance_id] = _Exact(self.max_blocks)
        if block_size > entry.block_size:
            if entry.counts:
                self.cleared(instance_id)
            entry.block_size = block_size
        elif block_size < entry.block_size:
            return None
        return entry

    def _add(
        self, instance_id: str, entry: _Exact, hashes: Sequence[int], keys: Sequence[int]
    ) -> None:
        counts, holders = entry.counts, self._holders
        for key in entry.blocks.add(hashes, keys):
            self._release(instance_id, entry, key)
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
            holders.setdefault(key, set()).add(instance_id)

    def _release(self, instance_id: str, entry: _Exact, key: int) -> None:
        left = entry.counts.get(key, 0) - 1
        if left > 0:
            entry.counts[key] = left
            return
        entry.counts.pop(key, None)
        self._unhold(instance_id, key)

    def _unhold(self, instance_id: str, key: int) -> None:
        holders = self._holders.get(key)
        if holders is not None:
            holders.discard(instance_id)
            if not holders:
                del self._holders[key]

    def _drop_keys(self, instance_id: str, keys: Mapping[int, object]) -> None:
        for key in keys:
            self._unhold(instance_id, key)

    # --- approximate: what the gateway routed -------------------------------------------------

    def routed(
        self,
        instance_id: str,
        keys: Sequence[int],
        block_size: int,
        now: float,
        capacity: int | None = None,
    ) -> None:
        """The prompt of ``keys`` was sent to the instance: it will hold those blocks (for an
        instance without events; an exact one says so itself)."""
        entry = self._instances.get(instance_id)
        if isinstance(entry, _Exact) or not keys or block_size <= 0:
            return
        if entry is None:
            if len(self._instances) >= self.max_instances:
                return
            entry = self._instances[instance_id] = _Approximate(self.approximate_ttl_s)
        if entry.block_size != block_size:
            self._drop_keys(instance_id, entry.touched)
            entry.touched.clear()
            entry.block_size = block_size
        touched, holders = entry.touched, self._holders
        # Last block first: the prompt's first blocks are the most recent, so the least
        # recent to drop, as vLLM's free queue evicts a request's blocks last block first.
        for key in reversed(keys):
            if key in touched:
                touched.move_to_end(key)
            else:
                holders.setdefault(key, set()).add(instance_id)
            touched[key] = now
        limit = capacity if capacity is not None and capacity > 0 else self.approximate_max_blocks
        self._age(instance_id, entry, now, min(limit, self.approximate_max_blocks))

    def expire(self, now: float) -> None:
        """Drops every approximate entry older than the TTL (matching ignores them anyway;
        this only frees their memory)."""
        for instance_id, entry in list(self._instances.items()):
            if isinstance(entry, _Approximate):
                self._age(instance_id, entry, now, self.approximate_max_blocks)

    def _age(self, instance_id: str, entry: _Approximate, now: float, limit: int) -> None:
        touched = entry.touched
        while touched:
            key, at = next(iter(touched.items()))
            if len(touched) <= limit and now - at <= entry.ttl_s:
                break
            del touched[key]
            self._unhold(instance_id, key)

    # --- matching -------------------------------------------------------------------------------

    def match(self, token_ids: Sequence[int], block_size: int, now: float) -> PrefixMatch:
        """Cached prompt tokens per instance for a prompt of these token ids."""
        if not self._holders:
            return NO_MATCH
        return self.match_keys(prompt_keys(token_ids, block_size), block_size, now)

    def match_keys(self, keys: Sequence[int], block_size: int, now: float) -> PrefixMatch:
        """``match`` with the prompt's keys (``prompt_keys``) computed by the caller."""
        if not keys or not self._holders:
            return NO_MATCH
        instances = self._instances
        first = self._holders.get(keys[0], ())
        alive = [
            i
            for i in first
            if instances[i].block_size == block_size and instances[i].holds(keys[0], now)
        ]
        cached: dict[str, int] = {}
        depth = 1
        while alive and depth < len(keys):
            key = keys[depth]
            here = self._holders.get(key)
            if here is None:
                break
            kept = [i for i in alive if i in here and instances[i].holds(key, now)]
            if len(kept) != len(alive):
                for instance_id in set(alive).difference(kept):
                    cached[instance_id] = depth * block_size
            alive = kept
            depth += 1
        for instance_id in alive:
            cached[instance_id] = depth * block_size
        if not cached:
            return NO_MATCH
        approximate = frozenset(i for i in cached if instances[i].tracking is Tracking.APPROXIMATE)
        return PrefixMatch(cached, approximate, block_size)
