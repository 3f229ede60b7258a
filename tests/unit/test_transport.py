"""The KV transport between two real processes over gloo, on fake caches (no vLLM).

The exporter holds a cache whose block b is filled with the value b; the importer pulls runs of
blocks into other positions and checks every byte. Stalls, refusals and releases are driven
through the same messages the connector uses.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any

import pytest
import torch

from pdserve.cluster.processes import free_port
from pdserve.kv.layout import build_layout
from pdserve.kv.settings import KVSettings
from pdserve.kv.worker_side import ExportOrder, KVWorker, LoadOrder, LoadResult


def load(req_id: str, transfer_id: str, address: str, first: int, dst: list[int]) -> LoadOrder:
    return LoadOrder(req_id, transfer_id, [address], first, dst)


SECRET = b"transport-test"
BLOCKS = 32
SHAPE = (BLOCKS, 2, 16, 8)  # blocks, heads, block size, 2 * head size
LAYERS = 3


def fake_cache(fill_with_block_index: bool) -> dict[str, torch.Tensor]:
    caches = {}
    for layer in range(LAYERS):
        tensor = torch.zeros(SHAPE)
        if fill_with_block_index:
            for block in range(BLOCKS):
                tensor[block] = block + 1000 * layer
        caches[f"layers.{layer}"] = tensor
    return caches


def settings(name: str, port: int, timeout_s: float = 3.0) -> KVSettings:
    return KVSettings(
        instance_id=name,
        port=port,
        transfer_timeout_s=timeout_s,
        lease_s=5,
        pair_setup_timeout_s=2 * timeout_s,
    )


def exporter_main(port: int, commands: Any, replies: Any) -> None:
    os.environ["PDSERVE_FAULT_INJECTION"] = "1"
    worker = KVWorker(settings("exporter", port), build_layout(fake_cache(True), BLOCKS), 0, SECRET)
    replies.put("ready")
    try:
        while True:
            command = commands.get()
            if command is None:
                break
            if command[0] == "export":
                worker.add_export(
                    ExportOrder(command[1], command[2], command[3], lease_s=command[4])
                )
            elif command[0] == "finished":
                deadline = time.monotonic() + command[1]
                finished: set[str] = set()
                while time.monotonic() < deadline:
                    finished |= worker.poll()[0]
                    time.sleep(0.02)
                replies.put(sorted(finished))
            elif command[0] == "delay":
                worker._pull_delays.append(command[1])
    finally:
        worker.shutdown()


@pytest.fixture
def exporter() -> Any:
    ctx = mp.get_context("spawn")
    port = free_port()
    commands, replies = ctx.Queue(), ctx.Queue()
    process = ctx.Process(target=exporter_main, args=(port, commands, replies), daemon=True)
    process.start()
    assert replies.get(timeout=120) == "ready"
    yield port, commands, replies
    commands.put(None)
    process.join(10)
    if process.is_alive():
        process.kill()


def importer(timeout_s: float = 3.0) -> tuple[KVWorker, dict[str, torch.Tensor]]:
    caches = fake_cache(False)
    worker = KVWorker(
        settings("importer", free_port(), timeout_s), build_layout(caches, BLOCKS), 0, SECRET
    )
    return worker, caches


def wait_result(worker: KVWorker, timeout_s: float = 15) -> tuple[set[str], set[str]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, done, failed = worker.poll()
        if done:
            return done, failed
        time.sleep(0.02)
    raise AssertionError("the load never finished")


def test_pull_copies_runs_exactly(exporter: Any) -> None:
    port, commands, replies = exporter
    worker, caches = importer()
    try:
        commands.put(("export", "t1", "req-p", [4, 5, 6, 20], 30))
        address = f"tcp://127.0.0.1:{port}"
        # Export positions 0..3 are blocks 4, 5, 6, 20; they go to blocks 10, 11, 12, 0.
        worker.start_load(load("req-d", "t1", address, 0, [10, 11, 12, 0]))
        done, failed = wait_result(worker)
        assert done == {"req-d"} and not failed
        for layer in range(LAYERS):
            cache = caches[f"layers.{layer}"]
            for src, dst in [(4, 10), (5, 11), (6, 12), (20, 0)]:
                assert torch.all(cache[dst] == src + 1000 * layer)
            assert torch.all(cache[13] == 0) and torch.all(cache[1] == 0)
        commands.put(("finished", 1.0))
        assert replies.get(timeout=10) == ["req-p"], "the exporter frees its blocks after the pull"
        stats = worker.take_stats()
        assert stats.loads_ok == 1 and stats.pairs_opened == 1
        assert stats.bytes_received == 4 * LAYERS * caches["layers.0"][0].nbytes
    finally:
        worker.shutdown()


def test_many_transfers_reuse_one_pair(exporter: Any) -> None:
    port, commands, _ = exporter
    worker, caches = importer()
    try:
        address = f"tcp://127.0.0.1:{port}"
        for i in range(6):
            commands.put(("export", f"t{i}", f"p{i}", [i], 30))
        for i in range(6):
            worker.start_load(load(f"d{i}", f"t{i}", address, 0, [31 - i]))
        done: set[str] = set()
        deadline = time.monotonic() + 20
        while len(done) < 6 and time.monotonic() < deadline:
            _, finished, failed = worker.poll()
            assert not failed
            done |= finished
            time.sleep(0.02)
        assert len(done) == 6
        assert worker.take_stats().pairs_opened == 1
        for i in range(6):
            assert torch.all(caches["layers.1"][31 - i] == i + 1000)
    finally:
        worker.shutdown()


def test_stalled_pull_times_out_and_never_writes_late(exporter: Any) -> None:
    port, commands, replies = exporter
    worker, caches = importer(timeout_s=1.0)
    try:
        commands.put(("export", "slow", "req-p", [7], 30))
        commands.put(("delay", 3.0))
        time.sleep(0.2)
        started = time.monotonic()
        worker.start_load(load("req-d", "slow", f"tcp://127.0.0.1:{port}", 0, [9]))
        done, failed = wait_result(worker)
        assert done == failed == {"req-d"}
        assert time.monotonic() - started < 2.5
        # The exporter wakes up later and sends: the aborted pair must drop it.
        commands.put(("finished", 4.0))
        assert replies.get(timeout=15) == ["req-p"]
        assert torch.all(caches["layers.0"][9] == 0), "a late send reached freed blocks"
        # A new pair is formed for the next transfer.
        commands.put(("export", "after", "req-q", [8], 30))
        worker.start_load(load("req-e", "after", f"tcp://127.0.0.1:{port}", 0, [9]))
        done, failed = wait_result(worker)
        assert done == {"req-e"} and not failed
        assert torch.all(caches["layers.2"][9] == 8 + 2000)
    finally:
        worker.shutdown()


def test_unknown_transfer_fails_fast(exporter: Any) -> None:
    port, _, _ = exporter
    worker, _ = importer()
    try:
        worker.start_load(load("req-d", "missing", f"tcp://127.0.0.1:{port}", 0, [1]))
        _, failed = wait_result(worker, 15)
        assert failed == {"req-d"}
    finally:
        worker.shutdown()


def test_unreachable_exporter_fails_within_the_timeout() -> None:
    worker, _ = importer(timeout_s=1.0)
    try:
        started = time.monotonic()
        worker.start_load(load("req-d", "t", f"tcp://127.0.0.1:{free_port()}", 0, [1]))
        _, failed = wait_result(worker)
        assert failed == {"req-d"}
        assert time.monotonic() - started < 3
    finally:
        worker.shutdown()


def test_empty_load_releases_the_export(exporter: Any) -> None:
    port, commands, replies = exporter
    worker, _ = importer()
    try:
        commands.put(("export", "t", "req-p", [1], 30))
        worker.start_load(load("req-d", "t", f"tcp://127.0.0.1:{port}", 0, []))
        done, failed = wait_result(worker)
        assert done == {"req-d"} and not failed
        commands.put(("finished", 1.0))
        assert replies.get(timeout=10) == ["req-p"]
    finally:
        worker.shutdown()


def test_a_stranger_without_the_secret_is_ignored(exporter: Any) -> None:
    port, commands, replies = exporter
    caches = fake_cache(False)
    stranger = KVWorker(
        settings("stranger", free_port(), 1.0), build_layout(caches, BLOCKS), 0, b"wrong-secret"
    )
    try:
        commands.put(("export", "t", "req-p", [3], 30))
        stranger.start_load(load("x", "t", f"tcp://127.0.0.1:{port}", 0, [3]))
        _, failed = wait_result(stranger)
        assert failed == {"x"}
        assert torch.all(caches["layers.0"][3] == 0)
        commands.put(("finished", 0.5))
        assert replies.get(timeout=10) == [], "the export is still there for its real owner"
    finally:
        stranger.shutdown()


def test_results_queue_is_drained_once() -> None:
    worker, _ = importer()
    try:
        worker._results.put(LoadResult("a", ok=True))
        assert worker.poll()[1] == {"a"}
        assert worker.poll()[1] == set()
    finally:
        worker.shutdown()


def test_staged_pull_copies_the_same_bytes(exporter: Any) -> None:
    port, commands, _ = exporter
    worker, caches = importer()
    worker.staging = "always"
    try:
        commands.put(("export", "ts", "req-p", [2, 4, 6], 30))
        worker.start_load(load("req-d", "ts", f"tcp://127.0.0.1:{port}", 0, [20, 21, 9]))
        done, failed = wait_result(worker)
        assert done == {"req-d"} and not failed
        for layer in range(LAYERS):
            cache = caches[f"layers.{layer}"]
            for src, dst in [(2, 20), (4, 21), (6, 9)]:
                assert torch.all(cache[dst] == src + 1000 * layer)
            assert torch.all(cache[10] == 0)
    finally:
        worker.shutdown()
