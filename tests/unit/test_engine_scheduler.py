"""The load report built inside the engine, from a fake vLLM scheduler's queues."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

from vllm.v1.request import RequestStatus

from pdserve.instance.engine_scheduler import LoadReporter
from pdserve.kv.messages import PARAMS_KEY
from pdserve.kv.settings import KVSettings
from pdserve.protocol.net import free_port
from pdserve.protocol.reports import TransferCounters

BLOCK = 16


def request(rid: str, tokens: int, computed: int = 0, prompt: int | None = None, **kw: Any) -> Any:
    return SimpleNamespace(
        request_id=rid,
        num_tokens=tokens,
        num_prompt_tokens=prompt if prompt is not None else tokens,
        num_computed_tokens=computed,
        num_output_tokens=max(0, tokens - (prompt if prompt is not None else tokens)),
        status=kw.get("status", RequestStatus.WAITING),
        kv_transfer_params=kw.get("params"),
        block_hashes=kw.get("hashes", []),
    )


class FakeCoordinator:
    """vLLM's prefix-cache lookup: ``hits`` cached tokens per request id, calls counted."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.lookups: list[str] = []

    def find_longest_cache_hit(self, hashes: list[str], max_length: int) -> tuple[Any, int, int]:
        rid = hashes[0]
        self.lookups.append(rid)
        return (), min(self.hits.get(rid, 0), max_length), 0


def scheduler(
    running: list[Any],
    waiting: list[Any],
    holding: list[Any],
    free: int,
    coordinator: FakeCoordinator | None = None,
) -> Any:
    pool = SimpleNamespace(get_num_free_blocks=lambda: free, num_gpu_blocks=101)
    manager = SimpleNamespace(
        block_pool=pool,
        coordinator=coordinator or FakeCoordinator(),
        prefix_cache_lookup_enabled=lambda request: True,
    )
    return SimpleNamespace(
        running=running, waiting=waiting, kv_holding_waiting=holding, kv_cache_manager=manager
    )


@pytest.fixture
def reporter() -> Any:
    settings = KVSettings(port=free_port(), control_address=f"tcp://127.0.0.1:{free_port()}")
    made = LoadReporter(settings, BLOCK)
    yield made
    made.stop()


def test_waiting_blocks_count_only_requests_without_blocks(reporter: LoadReporter) -> None:
    loading = request("l", 64, status=RequestStatus.WAITING_FOR_REMOTE_KVS)
    fresh = request("f", 40)
    sched = scheduler(running=[], waiting=[fresh], holding=[loading], free=60)
    reporter.observe(sched, TransferCounters())
    report = reporter._latest
    assert report is not None
    assert report.num_waiting == 2 and report.num_loading == 1
    assert report.waiting_blocks == 3  # the fresh request's 40 tokens; not the loader's 4
    assert report.total_blocks == 100 and report.free_blocks == 60


def test_queued_tokens_leave_out_each_waiting_requests_cached_prefix(
    reporter: LoadReporter,
) -> None:
    coordinator = FakeCoordinator()
    coordinator.hits = {"a": 96, "b": 200}
    hot = request("a", 100, hashes=["a"])
    whole = request("b", 100, hashes=["b"])  # all cached: vLLM computes the last token
    cold = request("c", 50, hashes=["c"])
    loading = request("l", 64, computed=32, status=RequestStatus.WAITING_FOR_REMOTE_KVS)
    sched = scheduler([], [hot, whole, cold], [loading], free=60, coordinator=coordinator)
    reporter.observe(sched, TransferCounters())
    assert reporter._latest is not None
    assert reporter._latest.waiting_prompt_tokens == 4 + 1 + 50 + 32
    reporter.observe(sched, TransferCounters())
    assert sorted(coordinator.lookups) == ["a", "b", "c"]  # once while they wait
    sched.waiting = [cold]
    reporter.observe(sched, TransferCounters())
    sched.waiting = [hot, cold]  # preempted back to the queue: looked up again
    reporter.observe(sched, TransferCounters())
    assert coordinator.lookups.count("a") == 2 and coordinator.lookups.count("c") == 1


def test_running_requests_with_a_key_are_listed(reporter: LoadReporter) -> None:
    managed = request(
        "m", 50, computed=50, prompt=40, params={PARAMS_KEY: {"request_key": "key-1"}}
    )
    anonymous = request("a", 20, computed=10)
    sched = scheduler(running=[managed, anonymous], waiting=[], holding=[], free=90)
    reporter.observe(sched, TransferCounters())
    report = reporter._latest
    assert report is not None
    assert [(r.request_key, r.num_blocks, r.num_output_tokens) for r in report.running] == [
        ("key-1", 4, 10)
    ]
    assert report.waiting_prompt_tokens == 10  # the anonymous request's unfinished prefill


def test_step_work_counts_the_step_time_models_features() -> None:
    from pdserve.instance.engine_scheduler import add_step, step_work
    from pdserve.protocol.reports import StepTotals

    # After schedule(): computed tokens already count this step's (vLLM advances them).
    decoding = request("d", 101, computed=101, prompt=80)  # one token after 100 computed
    chunk = request("c", 300, computed=200, prompt=300)  # a 100-token chunk after 100
    work = step_work([decoding, chunk], {"d": 1, "c": 100})
    assert work == StepTotals(
        steps=1, prefill_tokens=100, prefill_pairs=100 * (100 + 50), decode_seqs=1,
        decode_context=101,
    )  # fmt: skip
    totals = add_step(add_step(StepTotals(), work, 0.5), work, 0.25)
    assert totals.steps == 2 and totals.seconds == 0.75 and totals.decode_context == 202
