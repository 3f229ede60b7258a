"""What an instance's prefix cache holds, as the gateway indexes it: chain keys and their batches.

vLLM names a cached block by its own hash, which depends on its hash function and a
per-process seed, so nobody outside the instance can compute it from a prompt. pdserve names
a block by a *chain key* instead, computed from token ids alone, the same way wherever it is
computed (the instance's relay, the gateway, the simulator):

    key(block 0) = H(ROOT_KEY, token ids of block 0)
    key(block i) = H(key(block i-1), token ids of block i)

with ``H`` an 8-byte BLAKE2b over the parent key and the block's ids as unsigned 32-bit
integers (explicit, so that a relay and a gateway on other Python builds agree; Python's own
``hash`` of a tuple differs between 32- and 64-bit builds). A key stands for the whole prefix
up to its block, as vLLM's hashes do, so two instances holding a key hold the same tokens.

``BlockKeys`` is the per-instance map from vLLM's hashes to chain keys (a ``BlockStored``
gives a block's parent by hash, a ``BlockRemoved`` names blocks by hash). The relay next to
each instance keeps one (``pdserve.instance.prefix_relay``) and sends the gateway
``PrefixEvents``: the same events with each stored block's key beside its hash, so the
gateway needs neither the token ids nor the parents. The gateway's index keeps one per
instance too (``pdserve.scheduler.prefix_index``), for removals.
"""

from __future__ import annotations

import array
import hashlib
from collections.abc import Iterator, Sequence

import msgspec

ROOT_KEY = 0
_KEY_BYTES = 8
# Blocks one map keeps at most: far above any instance's KV cache (a lost removal cannot
# grow it without bound); the oldest stored go first.
MAX_BLOCKS = 1 << 21


def _pack(token_ids: Sequence[int]) -> bytes | None:
    """The ids as unsigned 32-bit integers; None for an id out of that range."""
    try:
        return array.array("I", token_ids).tobytes()
    except (OverflowError, TypeError):
        return None


def _digest(parent: int, packed: bytes | memoryview) -> int:
    data = parent.to_bytes(_KEY_BYTES, "big", signed=True) + packed
    digest = hashlib.blake2b(data, digest_size=_KEY_BYTES).digest()
    return int.from_bytes(digest, "big", signed=True)


def block_key(parent: int, token_ids: Sequence[int]) -> int | None:
    """The chain key of one block whose parent block has key ``parent`` (``ROOT_KEY``: none)."""
    packed = _pack(token_ids)
    return None if packed is None else _digest(parent, packed)


def chain_keys(
    token_ids: Sequence[int], block_size: int, parent: int = ROOT_KEY, max_blocks: int | None = None
) -> list[int]:
    """The keys of the full blocks of ``token_ids`` (at most ``max_blocks``), each chained
    on the one before it; [] for an id out of the unsigned 32-bit range."""
    if block_size <= 0:
        return []
    blocks = len(token_ids) // block_size
    if max_blocks is not None:
        blocks = min(blocks, max_blocks)
    packed = _pack(token_ids[: blocks * block_size])
    if packed is None:
        return []
    view = memoryview(packed)
    step = block_size * 4
    keys = []
    key = parent
    for i in range(blocks):
        key = _digest(key, view[i * step : (i + 1) * step])
        keys.append(key)
    return keys


def prompt_keys(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The keys of the blocks a prompt can find in a prefix cache: vLLM computes the last
    prompt token again even on a full hit, so only full blocks before it can hit."""
    if not token_ids:
        return []
    return chain_keys(token_ids, block_size, max_blocks=(len(token_ids) - 1) // block_size)


def external_hash(value: int | bytes) -> int:
    """vLLM's ``ExternalBlockHash`` (an int, or the bytes of a SHA-256) as a 64-bit int, as
    vLLM's own ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`` turns it into one."""
    if isinstance(value, bytes):
        return int.from_bytes(value[-8:], "big")
    return value & ((1 << 64) - 1)


class BlockKeys:
    """One instance's cached blocks: its hash → chain key, oldest stored first.

    ``resolve`` finds a run's keys from its parent's (an unknown parent: None, the run's
    prefix was never seen or is gone); ``add`` stores them, and past ``max_blocks`` drops the
    oldest entries and returns their keys, so a caller that counts keys elsewhere can too.
    """

    def __init__(self, max_blocks: int = MAX_BLOCKS) -> None:
        self.max_blocks = max_blocks
        self._keys: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._keys

    def items(self) -> Iterator[tuple[int, int]]:
        return iter(self._keys.items())

    def key(self, block_hash: int) -> int | None:
        return self._keys.get(block_hash)

    def resolve(
        self,
        hashes: Sequence[int],
        parent: int | None,
        token_ids: Sequence[int],
        block_size: int,
    ) -> list[int] | None:
        """The keys of a ``BlockStored`` run (not stored yet); None if they cannot be known:
        token ids that are not whole blocks, or a parent this map does not hold."""
        if not hashes or block_size <= 0 or len(token_ids) != len(hashes) * block_size:
            return None
        parent_key = ROOT_KEY if parent is None else self._keys.get(parent)
        if parent_key is None:
            return None
        keys = chain_keys(token_ids, block_size, parent=parent_key)
        if len(keys) != len(hashes):
            return None
        return keys

    def add(self, hashes: Sequence[int], keys: Sequence[int]) -> list[int]:
        """Stores ``hashes[i]`` as ``keys[i]``; returns the keys dropped to stay bounded
        (and the keys a hash stood for before, if one is stored again)."""
        dropped = []
        own = self._keys
        for block_hash, key in zip(hashes, keys, strict=True):
            old = own.pop(block_hash, None)
            if old is not None:
                dropped.append(old)
            own[block_hash] = key
        while len(own) > self.max_blocks:
            oldest = next(iter(own))
            dropped.append(own.pop(oldest))
        return dropped

    def remove(self, hashes: Sequence[int]) -> list[int]:
        """Forgets the hashes; returns the keys they stood for (unknown ones are skipped)."""
        own = self._keys
        return [key for key in (own.pop(h, None) for h in hashes) if key is not None]

    def clear(self) -> None:
        self._keys.clear()


class Stored(msgspec.Struct, array_like=True, frozen=True, tag="s"):
    """Blocks now cached: ``hashes[i]`` (the instance's own name, for a later removal) holds
    the block of chain key ``keys[i]``."""

    hashes: list[int]
    keys: list[int]


class Removed(msgspec.Struct, array_like=True, frozen=True, tag="r"):
    """Blocks evicted from the prefix cache, by the instance's hash."""

    hashes: list[int]


class Cleared(msgspec.Struct, array_like=True, frozen=True, tag="c"):
    """The instance's prefix cache was emptied (vLLM's ``AllBlocksCleared``)."""


PrefixEvent = Stored | Removed | Cleared


class PrefixEvents(msgspec.Struct, tag=True, frozen=True):
    """A batch of an instance's prefix-cache changes, in order, numbered from 1 per start.

    ``full``: the batch starts a complete picture of the cache (what was known of this
    instance is dropped first; more batches of the picture may follow in sequence). The relay
    sends one when it (re)connects to the gateway and after it had to drop a batch, so a
    gateway that restarted or missed batches is whole again. A gateway that sees a number
    skipped drops the instance's entries and rebuilds from the batches that follow.
    """

    instance_id: str
    incarnation: str
    seq: int
    block_size: int
    events: list[PrefixEvent]
    full: bool = False
