"""The simulated instances' prefix events: what each engine's block pool caches and evicts,
sent to the control plane as the real instances' relays send it.

A real instance's relay (``pdserve.instance.prefix_relay``) turns vLLM's ``BlockStored`` /
``BlockRemoved`` into ``PrefixEvents`` batches of chain keys (``pdserve.protocol.prefix``:
key(block i) = H(key(block i-1), its token ids)) and the control plane applies them
(``ControlPlane.handle``, then ``gateway.prefix_events.PrefixRouting``). The simulator
sends the same batches into the same ``ControlPlane.handle``: its block pool names runs of
blocks instead of hashing them (``pdserve.sim.blocks``), so each run's blocks are given the
chain keys of the token ids they hold (``RunKeys``: computed once from the requests' token
ids, the answer of a conversation's last turn synthetic), and the pool's changes become
``Stored`` (a run's blocks cached; as its hash, its key as an unsigned 64-bit int: a key
names a block uniquely on an instance) and
``Removed`` (evicted from its tail). The cache-aware policy then matches a request's token
ids (``RequestEstimate.prompt_token_ids``) against what the engines really hold.

Timing: the relay sends a batch every 20 ms; the simulator delivers each engine's pending
events before every decision (``SimCluster.sync``), as if they arrived at once. Only a
policy that reads the index gets events (``PrefixRouting.enabled``); runs without token ids
(a migration's pre-copy, text prompts) are not indexed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from pdserve.protocol.prefix import (
    PrefixEvent,
    PrefixEvents,
    Removed,
    Stored,
    chain_keys,
    external_hash,
)
from pdserve.sim.blocks import Chain, PrefixKey

# A pool's change: run ``key``'s blocks ``lo`` .. ``hi`` - 1 were cached (True) or evicted.
PoolListener = Callable[[PrefixKey, int, int, bool], None]


class RunKeys(dict[PrefixKey, list[int]]):
    """Every named run's blocks' chain keys, from the token ids of a prompt it starts."""

    def add(self, chain: Chain, token_ids: Sequence[int], block_size: int) -> None:
        """Keys for the runs of ``chain`` not known yet; ``token_ids`` must cover the
        chain's blocks (a prompt and its answer)."""
        total = sum(size for _, size in chain)
        if not chain or all(key in self for key, _ in chain):
            return
        keys = chain_keys(token_ids, block_size, max_blocks=total)
        if len(keys) < total:
            return  # ids out of range, or too few: not indexed
        start = 0
        for key, size in chain:
            self.setdefault(key, keys[start : start + size])
            start += size


class Instance(Protocol):
    instance_id: str
    incarnation: str
    block_size: int


class PrefixOutbox:
    """Pending events per engine, numbered from 1 per engine, flushed before decisions."""

    def __init__(self, runs: RunKeys) -> None:
        self.runs = runs
        self._pending: dict[str, tuple[Instance, list[PrefixEvent]]] = {}
        self._seq: dict[str, int] = {}

    def listener(self, instance: Instance) -> PoolListener:
        """The callback an engine's pool calls on every change of a cached run."""

        def changed(key: PrefixKey, lo: int, hi: int, stored: bool) -> None:
            keys = self.runs.get(key)
            if not keys or hi <= lo:
                return
            blocks = keys[lo:hi]
            hashes = [external_hash(k) for k in blocks]  # as the index reads a removal's
            event: PrefixEvent = Stored(hashes, blocks) if stored else Removed(hashes)
            pending = self._pending.get(instance.instance_id)
            if pending is None:
                pending = self._pending[instance.instance_id] = (instance, [])
            pending[1].append(event)

        return changed

    def flush(self, deliver: Callable[[PrefixEvents], None]) -> None:
        """Every engine's pending events as one batch each, in the order they happened."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        for instance_id, (instance, events) in pending.items():
            seq = self._seq.get(instance_id, 0) + 1
            self._seq[instance_id] = seq
            deliver(
                PrefixEvents(
                    instance_id=instance_id,
                    incarnation=instance.incarnation,
                    seq=seq,
                    block_size=instance.block_size,
                    events=events,
                )
            )
