"""A decode instance that holds part of the prompt in its prefix cache pulls only the rest.

The connector's scheduler side is given vLLM's local prefix-cache hit (``num_computed_tokens``
of ``get_num_new_matched_tokens``) and orders a pull that starts after it; two KV workers in
this process over gloo then move exactly those blocks, and the bytes the load counts are
theirs alone (``TransferCounters.bytes_received``, per load ``LoadResult.nbytes``). This is
what the cache-aware policy prices when it prefers a decode instance holding the prefix.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from pdserve.kv.scheduler_side import SchedulerSide
from pdserve.kv.settings import KVSettings
from pdserve.kv.worker_side import ExportOrder, KVWorker, LoadOrder
from tests.unit.kv_fakes import (
    FakeBlocks,
    FakeCacheManager,
    FakeSchedulerOutput,
    decode_request,
    kv_cache_config,
    source_for,
    vllm_config,
)
from tests.unit.test_pair_reuse import caches, worker

TOKENS = list(range(100, 110))  # 10 tokens: blocks of 4, 4 and 2


def ordered_load(local_hit: int, dst: list[int]) -> LoadOrder:
    """The load the scheduler side orders for a decode request with ``local_hit`` tokens of
    its prompt already in this instance's prefix cache."""
    settings = KVSettings(instance_id="here", port=7100, sync_load_max_tokens=0)
    scheduler = SchedulerSide(vllm_config(1), kv_cache_config(), settings, b"secret")
    scheduler.bind(FakeCacheManager())  # type: ignore[arg-type]
    request = decode_request("req-d", TOKENS, source_for(TOKENS, scheduler.cache_fingerprint))
    tokens, _ = scheduler.get_num_new_matched_tokens(request, local_hit)  # type: ignore[arg-type]
    assert tokens == len(TOKENS) - local_hit
    scheduler.update_state_after_alloc(request, FakeBlocks(dst), tokens)  # type: ignore[arg-type]
    (order,) = scheduler.build_orders(FakeSchedulerOutput()).loads  # type: ignore[arg-type]
    return order


@pytest.mark.parametrize(
    ("local_hit", "first", "pulled"),
    [(0, 0, [5, 6, 7]), (4, 1, [6, 7]), (8, 2, [7])],
)
def test_the_pull_starts_after_the_local_prefix_hit(
    local_hit: int, first: int, pulled: list[int]
) -> None:
    order = ordered_load(local_hit, [5, 6, 7])
    # The block holding the last prompt token is pulled too (it holds positions 8 and 9; the
    # last one is computed again): blocks first.. of the export into the blocks after the hit.
    assert (order.first, order.dst) == (first, pulled)


def pull(importer: KVWorker, order: LoadOrder) -> int:
    """Runs the load; the bytes it received (the worker's counters since the last call)."""
    importer.start_load(order)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        _, done, failed = importer.poll()
        if done:
            assert done == {order.req_id} and not failed
            return importer.take_stats().bytes_received
        time.sleep(0.02)
    raise AssertionError("the load never finished")


def test_only_the_missing_blocks_move_and_count_as_the_bytes_received() -> None:
    exporter, _ = worker("exporter", True)  # block b of layer l holds b + 100 l
    importer, cache = worker("importer", False)
    block_bytes = 2 * caches(True)["layers.0"][0].nbytes  # one block of both layers
    try:
        exporter.add_export(ExportOrder("t1", "req-p", [1, 2, 3], lease_s=30))
        hit = dataclasses.replace(ordered_load(4, [5, 6, 7]), addresses=[exporter.address])
        assert pull(importer, hit) == 2 * block_bytes
        for layer in range(2):
            layer_cache = cache[f"layers.{layer}"]
            assert torch.all(layer_cache[5] == 0), "the block cached here is not written"
            assert torch.all(layer_cache[6] == 2 + 100 * layer)
            assert torch.all(layer_cache[7] == 3 + 100 * layer)
        # Without a local hit the same prompt moves all three blocks.
        exporter.add_export(ExportOrder("t2", "req-q", [1, 2, 3], lease_s=30))
        miss = dataclasses.replace(
            ordered_load(0, [0, 1, 2]), transfer_id="t2", addresses=[exporter.address]
        )
        assert pull(importer, miss) == 3 * block_bytes
    finally:
        importer.shutdown()
        exporter.shutdown()
