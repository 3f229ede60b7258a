"""KV transfers between workers: NCCL waits for the device, transfers of any number of
messages, layouts checked plane by plane, and pair set-up that busy serving threads cannot
starve (issue 11, faults 11 and 12).

Workers pair over gloo in one process, on fake caches (block b of an exporter holds b).
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import zmq

from pdserve.kv import transport
from pdserve.kv.layout import build_layout
from pdserve.kv.messages import KVError, KVFailure, KVTimeout
from pdserve.kv.metadata import ExportOrder, LoadOrder
from pdserve.kv.settings import KVSettings
from pdserve.kv.transport import tag_of, transfer, wait_all
from pdserve.kv.worker_side import KVWorker, LoadResult
from pdserve.protocol.net import free_port
from pdserve.protocol.reports import KVHoldings

SECRET = b"kv-transfers-test"
BLOCKS = 8

# --- workers pairing in this process (also used by test_kv_faults) --------------------------


def caches(filled: bool, width: int = 8) -> dict[str, torch.Tensor]:
    out = {}
    for layer in range(2):
        tensor = torch.zeros(BLOCKS, 2, 4, width)
        if filled:
            for block in range(BLOCKS):
                tensor[block] = block + 100 * layer
        out[f"layers.{layer}"] = tensor
    return out


def make_worker(
    name: str, filled: bool, port: int | None = None, width: int = 8, **settings: Any
) -> tuple[KVWorker, dict[str, torch.Tensor]]:
    values: dict[str, Any] = {"transfer_timeout_s": 3.0, "lease_s": 30, "pair_setup_timeout_s": 6.0}
    values.update(settings)
    config = KVSettings(instance_id=name, port=port or free_port(), **values)
    cache = caches(filled, width)
    return KVWorker(config, build_layout(cache, BLOCKS), 0, SECRET), cache


def restarted(name: str, port: int, **settings: Any) -> KVWorker:
    """A worker on the port of one just shut down (ZeroMQ frees the port asynchronously)."""
    for _ in range(50):
        try:
            return make_worker(name, False, port=port, **settings)[0]
        except zmq.ZMQError:
            time.sleep(0.1)
    raise AssertionError(f"port {port} stayed in use")


def load(worker: KVWorker, transfer_id: str, address: str, dst: list[int]) -> LoadResult:
    """Runs one load and returns its result (read off the worker's result queue)."""
    worker.start_load(LoadOrder("d-" + transfer_id, transfer_id, [address], 0, dst))
    return worker._results.get(timeout=60)


def pulled(worker: KVWorker, transfer_id: str, address: str, dst: list[int]) -> None:
    result = load(worker, transfer_id, address, dst)
    assert result.ok, f"{result.failure}: {result.error}"


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what} ({_seen})")
        time.sleep(0.02)


_seen: dict[str, KVHoldings] = {}


def idle(worker: KVWorker, pairs: int) -> bool:
    """Nothing held but ``pairs`` pairs (what was seen is kept for ``wait_for``'s message)."""
    _seen[worker.settings.instance_id] = holdings = worker.holdings()
    return holdings == KVHoldings(held_exports=0, open_pairs=pairs, inflight_pulls=0)


# --- fault 11: NCCL waits for the device; transfers of any number of messages ------------------


class _DeviceWork:
    """An NCCL work as torch returns it: ``wait`` returns at once, the device finishes later."""

    def __init__(self, done_after_s: float, error: bool = False) -> None:
        self._done_at = time.monotonic() + done_after_s
        self._error = error

    def is_completed(self) -> bool:
        return time.monotonic() >= self._done_at

    def wait(self, timeout: Any = None) -> bool:
        if self._error and self.is_completed():
            raise RuntimeError("NCCL error: remote process exited")
        return True


def test_an_nccl_wait_returns_only_once_the_operation_ran_on_the_device() -> None:
    started = time.monotonic()
    wait_all([_DeviceWork(0.2), _DeviceWork(0.3)], time.monotonic() + 5, backend="nccl")
    assert time.monotonic() - started >= 0.3


def test_an_nccl_operation_late_or_failed_on_the_device_is_a_timeout_or_transport_error() -> None:
    with pytest.raises(KVTimeout):
        wait_all([_DeviceWork(10.0)], time.monotonic() + 0.1, backend="nccl")
    with pytest.raises(KVError) as failed:
        wait_all([_DeviceWork(0.0, error=True)], time.monotonic() + 5, backend="nccl")
    assert failed.value.failure is KVFailure.TRANSPORT_ERROR


class _DevicePair:
    """An NCCL pair whose operations finish on the "device" ``done_after_s`` after posting;
    it records whether each window was posted only once the one before had run."""

    def __init__(self, done_after_s: float) -> None:
        self.peer_rank = 1
        self.backend = "nccl"
        self.done_after_s = done_after_s
        self.works: list[_DeviceWork] = []
        self.posted_over_pending = 0
        self.pg = SimpleNamespace(send=self._post, recv=self._post)

    def _post(self, tensors: list[torch.Tensor], rank: int, tag: int) -> _DeviceWork:
        if tag % transport.MESSAGES_PER_WINDOW == 0:  # a window's first message
            self.posted_over_pending += sum(not w.is_completed() for w in self.works)
        work = _DeviceWork(self.done_after_s)
        self.works.append(work)
        return work


def test_an_nccl_transfer_finishes_each_window_on_the_device_before_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transport, "MESSAGES_PER_WINDOW", 2)
    pair = _DevicePair(done_after_s=0.1)
    started = time.monotonic()
    tensors = [torch.zeros(1) for _ in range(5)]
    transfer(pair, tensors, seq=1, send=False, deadline=time.monotonic() + 5)  # type: ignore[arg-type]
    assert time.monotonic() - started >= 0.3, "three windows, each waited for on the device"
    assert pair.posted_over_pending == 0 and all(w.is_completed() for w in pair.works)


def test_a_staged_nccl_receive_scatters_only_what_the_device_received() -> None:
    """Staged receives land in a buffer copied into the blocks: the copy must not read the
    buffer before the NCCL receive ran (``work.wait()`` alone returns before that)."""
    cache = torch.zeros(BLOCKS, 2, 4, 8)
    layout = build_layout({"layers.0": cache}, BLOCKS)
    pair = _DevicePair(done_after_s=0.2)
    scattered_over_pending: list[int] = []

    def scatter(group: range, blocks: torch.Tensor, buffer: torch.Tensor) -> None:
        scattered_over_pending.append(sum(not w.is_completed() for w in pair.works))

    worker = SimpleNamespace(
        layout=SimpleNamespace(
            stage_groups=layout.stage_groups, staging_buffer=layout.staging_buffer, scatter=scatter
        ),
        _index=torch.tensor,
    )
    deadline = time.monotonic() + 5
    nbytes = KVWorker._receive(worker, pair, [(0, 2, 3)], 0, True, deadline)  # type: ignore[arg-type]
    assert nbytes == 3 * cache[0].nbytes
    assert scattered_over_pending == [0]


def test_a_layout_on_two_devices_is_refused() -> None:
    planes = {"l0": torch.zeros(4, 2, 8), "l1": torch.zeros(4, 2, 8, device="meta")}
    with pytest.raises(ValueError, match="is on meta"):
        build_layout(planes, num_blocks=4)


class _RecordingPair:
    """A pair whose process group records what is posted and what is still outstanding."""

    def __init__(self) -> None:
        self.peer_rank = 1
        self.backend = "gloo"
        self.outstanding = 0
        self.most_outstanding = 0
        self.tags: list[list[int]] = [[]]
        self.pg = SimpleNamespace(send=self._post, recv=self._post)

    def _post(self, tensors: list[torch.Tensor], rank: int, tag: int) -> Any:
        self.outstanding += 1
        self.most_outstanding = max(self.most_outstanding, self.outstanding)
        self.tags[-1].append(tag)
        pair = self

        class Work:
            def wait(self, timeout: Any = None) -> bool:
                pair.outstanding -= 1
                if pair.outstanding == 0:
                    pair.tags.append([])
                return True

        return Work()


def test_a_transfer_posts_windows_of_distinct_tags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "MESSAGES_PER_WINDOW", 4)
    pair = _RecordingPair()
    tensors = [torch.zeros(1) for _ in range(10)]
    transfer(pair, tensors, seq=3, send=True, deadline=time.monotonic() + 5)  # type: ignore[arg-type]
    windows = [w for w in pair.tags if w]
    assert [len(w) for w in windows] == [4, 4, 2] and pair.most_outstanding == 4
    assert all(len(set(w)) == len(w) for w in windows)
    with pytest.raises(ValueError):
        tag_of(0, 4)


def test_a_transfer_of_more_messages_than_a_window_copies_every_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Windows over gloo, shrunk so that a few dozen runs need several of them."""
    monkeypatch.setattr(transport, "MESSAGES_PER_WINDOW", 3)
    exporter, _ = make_worker("exporter", True)
    importer, cache = make_worker("importer", False)
    try:
        src, dst = [1, 3, 5, 7], [6, 4, 2, 0]  # four runs of one block, two planes: 8 messages
        exporter.add_export(ExportOrder("a", "p-a", src, lease_s=30))
        pulled(importer, "a", exporter.address, dst)
        for s, d in zip(src, dst, strict=True):
            for layer in range(2):
                assert torch.all(cache[f"layers.{layer}"][d] == s + 100 * layer)
        wait_for(lambda: idle(exporter, pairs=1) and idle(importer, pairs=1), 5, "idle")
    finally:
        importer.shutdown()
        exporter.shutdown()


def test_a_transfer_of_more_than_65536_runs_goes_through() -> None:
    """A fragmented cache (every other block): 65,600 runs, one message each, over gloo."""
    runs = 65_600
    filled = torch.arange(2 * runs, dtype=torch.float32).reshape(2 * runs, 1)
    empty = torch.zeros(runs, 1)
    settings = {"transfer_timeout_s": 120.0, "pair_setup_timeout_s": 10.0}
    exporter = KVWorker(
        KVSettings(instance_id="exporter", port=free_port(), **settings),
        build_layout({"l0": filled}, 2 * runs),
        0,
        SECRET,
    )
    importer = KVWorker(
        KVSettings(instance_id="importer", port=free_port(), **settings),
        build_layout({"l0": empty}, runs),
        0,
        SECRET,
    )
    try:
        exporter.add_export(ExportOrder("big", "p-big", list(range(0, 2 * runs, 2)), lease_s=300))
        importer.start_load(LoadOrder("d-big", "big", [exporter.address], 0, list(range(runs))))
        result = importer._results.get(timeout=300)
        assert result.ok, result.error
        assert torch.equal(empty[:, 0], filled[::2, 0])
    finally:
        importer.shutdown()
        exporter.shutdown()


def test_layers_with_blocks_apart_move_block_by_block_and_stage_in_place() -> None:
    """Blocks outermost across layers (vLLM's BLHNC): each block is contiguous, a run is not."""
    base = torch.arange(6 * 3 * 8, dtype=torch.float32).reshape(6, 3, 2, 4)
    caches = {f"layers.{i}": base[:, i] for i in range(3)}
    layout = build_layout(caches, num_blocks=6)
    slices = list(layout.slices([(1, 0, 3)], side=0))
    assert len(slices) == 3 * 3 == layout.message_count([(1, 0, 3)])
    assert all(s.is_contiguous() for s in slices)
    assert slices[1].data_ptr() == caches["layers.0"][2].data_ptr()
    contiguous = build_layout({f"layers.{i}": base[:, i].clone() for i in range(3)}, 6)
    assert layout.plane_digest != contiguous.plane_digest, "both ends must split runs alike"
    # Staged receives scatter into the cache itself, not into a copy of it.
    group = range(len(layout.planes))
    blocks = torch.tensor([4, 0])
    buffer = torch.full((layout.staging_buffer(group, 2).numel(),), 7, dtype=torch.uint8)
    layout.scatter(group, blocks, buffer)
    assert torch.all(caches["layers.2"][4].view(torch.uint8) == 7)
    assert torch.all(caches["layers.1"][1] == base[1, 1]), "other blocks untouched"


def test_a_layer_whose_blocks_are_not_contiguous_is_refused() -> None:
    heads_outermost = torch.zeros(2, 6, 4, 8).transpose(0, 1)  # [blocks, heads, ...] strided
    with pytest.raises(ValueError, match="not contiguous"):
        build_layout({"l0": heads_outermost}, num_blocks=6)


# --- fault 12: pair set-up has threads of its own ---------------------------------------------


def test_pair_setup_is_not_starved_by_busy_serving_threads() -> None:
    exporter, _ = make_worker("exporter", True)
    importer, cache = make_worker("importer", False, pair_setup_timeout_s=3.0)
    gate = threading.Event()
    try:
        for _ in range(8):  # every serving thread is busy
            exporter._serve_pool.submit(gate.wait, 30)
        pair = importer._pair_with(exporter.address, time.monotonic() + 3.0)
        assert pair.ready.is_set() and not pair.broken
        gate.set()
        exporter.add_export(ExportOrder("a", "p-a", [5], lease_s=30))
        pulled(importer, "a", exporter.address, [2])
        assert torch.all(cache["layers.1"][2] == 105)
        assert importer.take_stats().pairs_opened == 1
        wait_for(lambda: idle(exporter, pairs=1) and idle(importer, pairs=1), 5, "idle")
    finally:
        gate.set()
        importer.shutdown()
        exporter.shutdown()
