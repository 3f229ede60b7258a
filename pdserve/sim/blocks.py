"""One instance's KV block pool with vLLM's prefix cache, counted in blocks (no contents).

vLLM v1 keeps every block in one pool: a block is *in use* while some request references
it, and otherwise *free*. A free block that still holds a full block of computed tokens stays
in the prefix cache (findable by the hash of its content and of everything before it) until
an allocation needs it: free cached blocks are evicted least recently freed first. So the
free count vLLM reports (``get_num_free_blocks``) includes cached blocks.

The simulator has no token contents, so a cached prefix is named instead of hashed: a
``PrefixKey`` stands for a run of identical blocks (a shared system prompt of a workload's
prefix group, the blocks a live migration pre-copied to its target). A request's prompt is
a *chain* of such named runs, then its own tokens; a lookup walks the chain as vLLM walks
block hashes and stops at the first block missing. A run is evicted from its tail, as
vLLM's free queue evicts the blocks of a freed request last-block first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

PrefixKey = Hashable
# A prompt's named runs of blocks, in order: (key, blocks).
Chain = tuple[tuple[PrefixKey, int], ...]


@dataclass(slots=True)
class CachedRun:
    """The blocks of one named run present in this pool, and how many requests use them."""

    blocks: int = 0
    refs: int = 0


class BlockPool:
    """Free, cached and used blocks of one instance; every count stays within [0, total]."""

    def __init__(self, total: int, prefix_caching: bool = True) -> None:
        self.total = total
        self.free = total
        # Free blocks that hold a cached run (part of ``free``), evicted first-freed first.
        self.evictable = 0
        self.prefix_caching = prefix_caching
        self.runs: dict[PrefixKey, CachedRun] = {}
        self._lru: OrderedDict[PrefixKey, None] = OrderedDict()
        # Told of every change of a cached run: (key, first block, end, cached or evicted),
        # as vLLM's BlockStored / BlockRemoved (``pdserve.sim.prefix_events``).
        self.listener: Callable[[PrefixKey, int, int, bool], None] | None = None

    @property
    def used(self) -> int:
        return self.total - self.free

    def allocate(self, blocks: int) -> bool:
        """Takes ``blocks`` free blocks (evicting cached ones if it must); False if too few."""
        if blocks > self.free:
            return False
        uncached = self.free - self.evictable
        if blocks > uncached:
            self._evict(blocks - uncached)
        self.free -= blocks
        return True

    def release(self, blocks: int) -> None:
        """Returns blocks that held no named run (a request's own tokens)."""
        self.free += blocks
        assert self.free <= self.total, "released more blocks than were used"

    def lookup(self, chain: Chain, cap_blocks: int) -> list[tuple[PrefixKey, int]]:
        """The runs of ``chain`` found here and how many of their blocks, at most
        ``cap_blocks`` in all (vLLM always computes a prompt's last token itself)."""
        found: list[tuple[PrefixKey, int]] = []
        if not self.prefix_caching:
            return found
        total = 0
        for key, size in chain:
            run = self.runs.get(key)
            take = min(run.blocks if run else 0, size, cap_blocks - total)
            if take <= 0:
                break
            found.append((key, take))
            total += take
            if take < size:
                break
        return found

    def acquire(self, key: PrefixKey) -> None:
        """A request starts using a cached run: its blocks leave the free pool if idle."""
        run = self.runs[key]
        if run.refs == 0:
            self.free -= run.blocks
            self.evictable -= run.blocks
            self._lru.pop(key, None)
        run.refs += 1

    def unref(self, key: PrefixKey) -> None:
        """A request stops using a run: idle, its blocks are free but stay cached."""
        run = self.runs[key]
        run.refs -= 1
        if run.refs == 0:
            if run.blocks == 0:
                del self.runs[key]
                return
            self.free += run.blocks
            self.evictable += run.blocks
            self._lru[key] = None

    def adopt(self, key: PrefixKey, have: int, size: int) -> int:
        """A request computed run ``key`` (``size`` blocks) holding ``have`` of its blocks
        from the cache: its own blocks for the rest become the cached run, unless another
        request cached them meanwhile. Returns how many of its own blocks it gave (0: none,
        it keeps duplicates, as vLLM keeps a second copy of a block computed twice)."""
        if not self.prefix_caching:
            return 0
        run = self.runs.get(key)
        if run is None:
            if have:
                return 0
            run = self.runs[key] = CachedRun()
        if run.blocks != have or run.blocks >= size:
            return 0
        given = size - run.blocks
        if self.listener is not None:
            self.listener(key, run.blocks, size, True)
        run.blocks = size
        if have == 0:
            if run.refs == 0:
                self._lru.pop(key, None)
            run.refs += 1
        return given

    def cached_blocks(self, key: PrefixKey) -> int:
        run = self.runs.get(key)
        return run.blocks if run else 0

    def _evict(self, blocks: int) -> None:
        while blocks > 0:
            key = next(iter(self._lru))
            run = self.runs[key]
            take = min(blocks, run.blocks)
            if self.listener is not None:
                self.listener(key, run.blocks - take, run.blocks, False)
            run.blocks -= take
            self.evictable -= take
            blocks -= take
            if run.blocks == 0:
                del self._lru[key]
                del self.runs[key]

    def check(self, own_blocks: Sequence[int] = ()) -> None:
        """Invariants (tests): counts in range; used = requests' own blocks + runs in use."""
        assert 0 <= self.evictable <= self.free <= self.total
        in_use = sum(r.blocks for r in self.runs.values() if r.refs > 0)
        idle = sum(r.blocks for r in self.runs.values() if r.refs == 0)
        assert idle == self.evictable, (idle, self.evictable)
        assert self.used == sum(own_blocks) + in_use, (self.used, sum(own_blocks), in_use)
