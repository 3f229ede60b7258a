"""Process-group pairs outlive refused pulls, and a pull never claims an export it cannot serve.

Two KVWorkers in one process pair over gloo on fake caches (block b of the exporter holds b).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pdserve.kv.layout import build_layout
from pdserve.kv.messages import KVFailure, PullRequest
from pdserve.kv.settings import KVSettings
from pdserve.kv.worker_side import ExportOrder, KVWorker, LoadOrder
from pdserve.protocol.net import free_port

SECRET = b"pair-reuse-test"
BLOCKS = 8


def caches(filled: bool) -> dict[str, torch.Tensor]:
    out = {}
    for layer in range(2):
        tensor = torch.zeros(BLOCKS, 2, 4, 8)
        if filled:
            for block in range(BLOCKS):
                tensor[block] = block + 100 * layer
        out[f"layers.{layer}"] = tensor
    return out


def worker(name: str, filled: bool) -> tuple[KVWorker, dict[str, torch.Tensor]]:
    settings = KVSettings(
        instance_id=name,
        port=free_port(),
        transfer_timeout_s=3.0,
        lease_s=30,
        pair_setup_timeout_s=6.0,
    )
    cache = caches(filled)
    return KVWorker(settings, build_layout(cache, BLOCKS), 0, SECRET), cache


def load(worker: KVWorker, req_id: str, transfer_id: str, address: str, dst: list[int]) -> Any:
    worker.start_load(LoadOrder(req_id, transfer_id, [address], 0, dst))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        _, done, failed = worker.poll()
        if done:
            assert done == {req_id}
            return not failed
        time.sleep(0.02)
    raise AssertionError("the load never finished")


def pairs(worker: KVWorker) -> int:
    return worker.holdings().open_pairs


def test_refused_pulls_reuse_one_pair_on_each_side() -> None:
    exporter, _ = worker("exporter", True)
    importer, cache = worker("importer", False)
    try:
        assert load(importer, "d0", "missing", exporter.address, [1]) is False  # unknown
        for i in range(4):
            exporter.add_export(ExportOrder(f"r{i}", f"p{i}", [i], lease_s=30))
            exporter.exports.release(f"r{i}", tombstone_s=10)
            assert load(importer, f"d{i + 1}", f"r{i}", exporter.address, [1]) is False
        time.sleep(0.2)
        assert pairs(importer) == 1 and pairs(exporter) == 1
        # The same pair still moves blocks.
        exporter.add_export(ExportOrder("ok", "p-ok", [5], lease_s=30))
        assert load(importer, "d-ok", "ok", exporter.address, [2]) is True
        assert torch.all(cache["layers.1"][2] == 105)
        assert importer.take_stats().pairs_opened == 1
        assert pairs(importer) == 1 and pairs(exporter) == 1
    finally:
        importer.shutdown()
        exporter.shutdown()


def test_a_broken_pair_is_torn_down_on_both_sides() -> None:
    exporter, _ = worker("exporter", True)
    importer, cache = worker("importer", False)
    try:
        exporter.add_export(ExportOrder("a", "p-a", [3], lease_s=30))
        assert load(importer, "d-a", "a", exporter.address, [1]) is True
        assert pairs(importer) == 1 and pairs(exporter) == 1
        exporter._pull_delays.append(5.0)  # the next served pull stalls past the timeout
        exporter.add_export(ExportOrder("b", "p-b", [4], lease_s=30))
        assert load(importer, "d-b", "b", exporter.address, [2]) is False
        time.sleep(0.3)
        assert pairs(importer) == 0
        assert pairs(exporter) == 0, "the importer told the exporter to close the pair"
        exporter.add_export(ExportOrder("c", "p-c", [6], lease_s=30))
        assert load(importer, "d-c", "c", exporter.address, [3]) is True
        assert torch.all(cache["layers.0"][3] == 6)
        time.sleep(6)  # the stalled send wakes up on the aborted pair
        assert pairs(importer) == 1 and pairs(exporter) == 1
    finally:
        importer.shutdown()
        exporter.shutdown()


def test_a_pull_on_an_unknown_pair_leaves_the_export_pullable() -> None:
    exporter, _ = worker("exporter", True)
    try:
        exporter.add_export(ExportOrder("t", "p-t", [2], lease_s=30))
        replies: list[Any] = []
        exporter.messenger.reply = lambda identity, message: replies.append(message)  # type: ignore[method-assign]
        request = PullRequest(rid=1, transfer_id="t", pair_id="gone", seq=0, first=0, dst=[1])
        exporter._serve_pull(b"peer", request)
        assert replies[-1].code is KVFailure.UNKNOWN_PAIR
        assert len(exporter.exports) == 1
        assert exporter.poll()[0] == set(), "the export was not freed"
        claimed = exporter.exports.begin_pull(request)
        assert not isinstance(claimed, str), "the export is still pullable"
    finally:
        exporter.shutdown()


def test_after_the_exporter_forgets_the_pair_the_importer_pairs_again_and_pulls() -> None:
    exporter, _ = worker("exporter", True)
    importer, cache = worker("importer", False)
    try:
        exporter.add_export(ExportOrder("a", "p-a", [3], lease_s=30))
        assert load(importer, "d-a", "a", exporter.address, [1]) is True
        # The exporter restarted: it knows no pair any more.
        with exporter._pairs.lock:
            old = list(exporter._pairs.by_id.values())
            exporter._pairs.by_id.clear()
        for pair in old:
            pair.abort()
        exporter.add_export(ExportOrder("b", "p-b", [7], lease_s=30))
        assert load(importer, "d-b", "b", exporter.address, [4]) is True
        assert torch.all(cache["layers.1"][4] == 107)
        assert importer.take_stats().pairs_opened == 2
        assert pairs(importer) == 1 and pairs(exporter) == 1
    finally:
        importer.shutdown()
        exporter.shutdown()
