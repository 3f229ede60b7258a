"""The prefix index: KV events in, matches out; removals, clears, bounds and the approximate
fallback (``pdserve.scheduler.prefix_index``), and the chain keys it shares with the relays."""

from __future__ import annotations

import pytest

from pdserve.protocol.prefix import (
    ROOT_KEY,
    BlockKeys,
    block_key,
    chain_keys,
    external_hash,
    prompt_keys,
)
from pdserve.scheduler.prefix_index import NO_MATCH, PrefixIndex, Tracking

BS = 4
SYSTEM = list(range(100, 116))  # 4 blocks of 4
PROMPT = [*SYSTEM, 7, 8, 9]  # + a partial block: 16 tokens can hit


def store_chain(index: PrefixIndex, instance: str, tokens: list[int], first_hash: int = 1) -> None:
    """``BlockStored`` events as vLLM sends them: one run per block, chained by parent hash."""
    parent = None
    for i in range(len(tokens) // BS):
        block_hash = first_hash + i
        index.stored(instance, [block_hash], parent, tokens[i * BS : (i + 1) * BS], BS)
        parent = block_hash


def test_chain_keys_chain_on_the_parent_and_are_deterministic() -> None:
    keys = chain_keys(SYSTEM, BS)
    assert len(keys) == 4 and len(set(keys)) == 4
    assert keys[0] == block_key(ROOT_KEY, SYSTEM[:4])
    assert keys[1] == block_key(keys[0], SYSTEM[4:8])
    # The same block after another prefix is another key.
    assert chain_keys(SYSTEM[4:8], BS)[0] != keys[1]
    assert chain_keys(list(SYSTEM), BS) == keys
    # vLLM computes the last prompt token again: a prompt of exactly 4 blocks hits 3.
    assert prompt_keys(SYSTEM, BS) == keys[:3]
    assert prompt_keys(PROMPT, BS) == keys


def test_vllm_hashes_of_either_kind_become_64_bit_ints() -> None:
    assert external_hash(5) == 5
    assert external_hash(-1) == (1 << 64) - 1
    assert external_hash(b"\x00" * 24 + (7).to_bytes(8, "big")) == 7


def test_stored_blocks_match_a_prompt_that_shares_them() -> None:
    index = PrefixIndex()
    store_chain(index, "a", SYSTEM)
    store_chain(index, "b", SYSTEM[:8], first_hash=50)
    match = index.match(PROMPT, BS, now=0.0)
    assert dict(match) == {"a": 16, "b": 8}
    assert match.approximate == frozenset()
    assert index.tracking("a") is Tracking.EXACT
    # Another prompt's first block differs: nothing matches, whatever follows.
    assert dict(index.match([0, *PROMPT[1:]], BS, now=0.0)) == {}


def test_one_run_of_several_blocks_chains_inside_the_run() -> None:
    index = PrefixIndex()
    assert index.stored("a", [1, 2, 3], None, SYSTEM[:12], BS) == 3
    assert index.stored("a", [4], 3, SYSTEM[12:], BS) == 1
    assert index.match(PROMPT, BS, now=0.0).tokens("a") == 16


def test_a_run_whose_parent_is_unknown_is_skipped() -> None:
    index = PrefixIndex()
    assert index.stored("a", [9], 1234, SYSTEM[4:8], BS) == 0
    assert index.stored("a", [1], None, SYSTEM[:3], BS) == 0  # not a whole block
    assert index.match(PROMPT, BS, now=0.0) == NO_MATCH


def test_removal_cuts_the_match_at_the_removed_block() -> None:
    index = PrefixIndex()
    store_chain(index, "a", SYSTEM)
    index.removed("a", [3])  # the third block
    assert index.match(PROMPT, BS, now=0.0).tokens("a") == 8
    index.removed("a", [1])
    assert index.match(PROMPT, BS, now=0.0).tokens("a") == 0
    index.removed("a", [999])  # unknown: ignored
    assert index.blocks("a") == 2


def test_clear_empties_the_instance_which_fills_again_from_new_events() -> None:
    index = PrefixIndex()
    store_chain(index, "a", SYSTEM)
    store_chain(index, "b", SYSTEM, first_hash=20)
    index.cleared("a")
    assert dict(index.match(PROMPT, BS, now=0.0)) == {"b": 16}
    assert index.tracking("a") is Tracking.EXACT
    store_chain(index, "a", SYSTEM[:4], first_hash=30)
    assert index.match(PROMPT, BS, now=0.0).tokens("a") == 4


def test_forget_drops_everything_and_unused_keys() -> None:
    index = PrefixIndex()
    store_chain(index, "a", SYSTEM)
    index.forget("a")
    assert len(index) == 0 and index.tracking("a") is None
    assert index.match(PROMPT, BS, now=0.0) == NO_MATCH


def test_keys_computed_by_the_sender_match_the_same_prompt() -> None:
    index = PrefixIndex()
    keys = chain_keys(SYSTEM, BS)
    assert index.stored_keys("a", [11, 12, 13, 14], keys, BS) == 4
    assert index.match(PROMPT, BS, now=0.0).tokens("a") == 16
    index.removed("a", [14])
    assert index.match(PROMPT, BS, now=0.0).tokens("a") == 12


def test_only_instances_of_the_asked_block_size_match() -> None:
    index = PrefixIndex()
    store_chain(index, "a", SYSTEM)
    index.stored("b", [1, 2], None, SYSTEM[:16], 8)
    assert dict(index.match(PROMPT, BS, now=0.0)) == {"a": 16}
    assert dict(index.match([*SYSTEM, 1], 8, now=0.0)) == {"b": 16}
    assert index.block_sizes() == {4, 8}


def test_smaller_partial_entries_are_ignored_and_a_larger_block_size_wins() -> None:
    index = PrefixIndex()
    store_chain(index, "a", SYSTEM)
    assert index.stored("a", [70], 4, [1, 2], 2) == 0  # a partial tail entry
    assert index.stored("a", [80], None, SYSTEM[:8], 8) == 1  # the real cache block
    assert index.match(PROMPT, BS, now=0.0) == NO_MATCH
    assert index.match([*SYSTEM[:8], 1], 8, now=0.0).tokens("a") == 8


def test_memory_per_instance_is_bounded_oldest_first() -> None:
    index = PrefixIndex(max_blocks=3)
    store_chain(index, "a", SYSTEM)
    assert index.blocks("a") == 3
    # The first block went: nothing can hit any more (a prefix starts at block 0).
    assert index.match(PROMPT, BS, now=0.0) == NO_MATCH
    blocks = BlockKeys(max_blocks=2)
    assert blocks.add([1, 2, 3], [10, 20, 30]) == [10]
    assert len(blocks) == 2 and blocks.key(3) == 30


def test_instances_beyond_the_bound_are_not_tracked() -> None:
    index = PrefixIndex(max_instances=1)
    store_chain(index, "a", SYSTEM)
    store_chain(index, "b", SYSTEM)
    index.routed("c", chain_keys(SYSTEM, BS), BS, now=0.0)
    assert dict(index.match(PROMPT, BS, now=0.0)) == {"a": 16}


def test_the_approximate_fallback_records_routing_and_ages_out() -> None:
    index = PrefixIndex(approximate_ttl_s=10.0)
    index.routed("x", prompt_keys(PROMPT, BS), BS, now=0.0)
    match = index.match(PROMPT, BS, now=5.0)
    assert dict(match) == {"x": 16}
    assert match.approximate == frozenset({"x"})
    assert index.tracking("x") is Tracking.APPROXIMATE
    assert index.match(PROMPT, BS, now=11.0) == NO_MATCH  # aged out
    index.routed("x", prompt_keys(PROMPT[:9], BS), BS, now=12.0)  # touched again: 2 blocks
    assert index.match(PROMPT, BS, now=13.0).tokens("x") == 8
    index.expire(now=30.0)
    assert index.blocks("x") == 0 and len(index) == 0


def test_the_approximate_fallback_keeps_at_most_the_capacity_least_recent_out() -> None:
    index = PrefixIndex()
    other = [200 + t for t in range(8)]
    index.routed("x", chain_keys(SYSTEM, BS), BS, now=0.0, capacity=4)
    index.routed("x", chain_keys(other, BS), BS, now=1.0, capacity=4)
    assert index.blocks("x") == 4
    # The older prompt lost its last blocks first (its first ones serve every extension).
    assert index.match(PROMPT, BS, now=2.0).tokens("x") == 8
    assert index.match([*other, 1], BS, now=2.0).tokens("x") == 8


def test_events_replace_the_approximate_entries_of_an_instance() -> None:
    index = PrefixIndex()
    index.routed("x", chain_keys(SYSTEM, BS), BS, now=0.0)
    store_chain(index, "x", SYSTEM[:4])
    match = index.match(PROMPT, BS, now=0.0)
    assert dict(match) == {"x": 4} and match.approximate == frozenset()
    index.routed("x", chain_keys(SYSTEM, BS), BS, now=0.0)  # ignored: events say it now
    assert index.match(PROMPT, BS, now=0.0).tokens("x") == 4


@pytest.mark.parametrize("tokens", [[-1, 2, 3, 4, 5], [1 << 40, 2, 3, 4, 5]])
def test_token_ids_out_of_range_match_nothing(tokens: list[int]) -> None:
    index = PrefixIndex()
    store_chain(index, "a", SYSTEM)
    assert index.match(tokens, BS, now=0.0) == NO_MATCH


def test_a_match_costs_one_walk_over_the_prompt_blocks() -> None:
    """Many instances, one long prompt: every holder is counted where its prefix ends."""
    index = PrefixIndex()
    long = list(range(1000, 1000 + 64 * BS))
    for n in range(16):
        store_chain(index, f"i{n}", long[: (n + 1) * 4 * BS], first_hash=10_000 * (n + 1))
    match = index.match([*long, 1], BS, now=0.0)
    assert {i: match.tokens(f"i{i}") for i in range(16)} == {i: (i + 1) * 16 for i in range(16)}
