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
    )


def scheduler(running: list[Any], waiting: list[Any], holding: list[Any], free: int) -> Any:
    pool = SimpleNamespace(get_num_free_blocks=lambda: free, num_gpu_blocks=101)
    return SimpleNamespace(
        running=running,
        waiting=waiting,
        kv_holding_waiting=holding,
        kv_cache_manager=SimpleNamespace(block_pool=pool),
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
