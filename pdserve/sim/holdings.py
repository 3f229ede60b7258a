"""What one engine holds: its waiting queue and its KV blocks, with vLLM's prefix cache.

``SimEngine`` builds on this: the bookkeeping of which blocks a request (a leg) holds, of
its own and through cached runs (``blocks.BlockPool``), apart from the scheduling that
decides when it gets them. The prefix-cache counters are vLLM's
(``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits``, in tokens), counted as a
request is admitted; vLLM also counts a lookup that then finds no room, again at each try.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Sequence

from pdserve.protocol.net import cdiv
from pdserve.sim.blocks import BlockPool, PrefixKey
from pdserve.sim.legs import EngineConfig, EngineCounters, Leg, LegState


class EngineHoldings:
    """The waiting queue (with its token and block totals, which reports carry) and the
    block pool of one engine."""

    def __init__(self, config: EngineConfig) -> None:
        self.block_size = config.block_size
        self.pool = BlockPool(config.num_blocks, config.prefix_caching)
        self.watermark_blocks = int(config.watermark * config.num_blocks)
        self.by_priority = config.priority_scheduling
        self.waiting: deque[Leg] = deque()
        self.waiting_tokens = 0
        self.waiting_blocks = 0
        self.counters = EngineCounters()

    def _enqueue(self, leg: Leg, front: bool = False) -> None:
        """Into the waiting queue: at the front (``front``: preempted, or its pull failed) or
        the back, as vLLM's FCFS queue; under priority scheduling in (priority, arrival)
        order wherever it comes from (vLLM's heap), after the equal ones."""
        if self.by_priority:
            index = bisect_right(
                self.waiting, leg.schedule_key, key=lambda waiting: waiting.schedule_key
            )
            self.waiting.insert(index, leg)
        elif front:
            self.waiting.appendleft(leg)
        else:
            self.waiting.append(leg)
        leg.queued_tokens = leg.num_tokens - self._cached_tokens(leg)
        self.waiting_tokens += leg.queued_tokens
        self.waiting_blocks += cdiv(leg.num_tokens, self.block_size)

    def _dequeue(self) -> Leg:
        leg = self.waiting.popleft()
        self._unqueue(leg)
        return leg

    def _unqueue(self, leg: Leg) -> None:
        self.waiting_tokens -= leg.queued_tokens
        self.waiting_blocks -= cdiv(leg.num_tokens, self.block_size)

    def _prefix_hit(self, leg: Leg) -> tuple[list[tuple[PrefixKey, int]], int]:
        """The cached runs of the leg's chain and their blocks in all (never its last
        token's block: vLLM computes a prompt's last token itself)."""
        found = self.pool.lookup(leg.chain, (leg.num_tokens - 1) // self.block_size)
        return found, sum(take for _, take in found)

    def _cached_tokens(self, leg: Leg) -> int:
        """The prefix-cache hit a leg finds as it joins the queue: the report counts only the
        rest as queued (``pdserve.instance.engine_scheduler`` looks it up alike)."""
        return self._prefix_hit(leg)[1] * self.block_size

    def _free(self, leg: Leg) -> None:
        """Its blocks go back to the pool; what it computed of its chain stays cached (the
        last run freed first, so the chain's tail is evicted first, as vLLM's free queue)."""
        if leg.adopted < len(leg.chain):
            self._adopt(leg)  # runs filled outside a step (an epoch's decode)
        self.pool.release(leg.own_blocks)
        for key, _ in reversed(leg.refs):
            self.pool.unref(key)
        leg.own_blocks = leg.hit_blocks = leg.adopted = 0
        leg.refs = []

    def _looked_up(self, tokens: int, hit_blocks: int) -> None:
        """A request admitted with ``tokens`` tokens found ``hit_blocks`` of them cached."""
        self.counters.prefix_queries += tokens
        self.counters.prefix_hits += hit_blocks * self.block_size

    def _take(self, leg: Leg, found: Sequence[tuple[PrefixKey, int]], new: int) -> bool:
        """Gives a waiting leg its cached runs and ``new`` blocks, if that leaves the
        watermark free (vLLM counts idle cached blocks it revives as allocated too)."""
        pool = self.pool
        revived = sum(pool.runs[key].blocks for key, _ in found if pool.runs[key].refs == 0)
        if new + revived > pool.free - self.watermark_blocks:
            return False
        for key, _ in found:
            pool.acquire(key)
        pool.allocate(new)
        leg.refs = list(found)
        leg.hit_blocks = sum(take for _, take in found)
        leg.own_blocks = new
        return True

    def _adopt(self, leg: Leg) -> None:
        """Runs of the leg's chain it has now computed become cached (vLLM caches every
        full block it computes)."""
        chain = leg.chain
        if leg.adopted >= len(chain):
            return
        full = leg.num_computed // self.block_size
        start = sum(size for _, size in chain[: leg.adopted])
        while leg.adopted < len(chain):
            key, size = chain[leg.adopted]
            if full < start + size:
                return
            held = next((i for i, (k, _) in enumerate(leg.refs) if k == key), None)
            have = leg.refs[held][1] if held is not None else 0
            given = self.pool.adopt(key, have, size)
            if given:
                leg.own_blocks -= given
                leg.hit_blocks += given
                if held is None:
                    leg.refs.append((key, size))
                else:
                    leg.refs[held] = (key, size)
            start += size
            leg.adopted += 1

    def _preempt(self, leg: Leg) -> None:
        self._free(leg)
        leg.num_computed = 0
        leg.state = LegState.WAITING
        self._enqueue(leg, front=True)
        self.counters.preemptions += 1
