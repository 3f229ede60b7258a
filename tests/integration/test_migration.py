"""Live migration of running requests between decode instances (issue 5), on real vLLM."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from typing import Any

import pytest

from tests.integration.helpers import (
    PlainVLLM,
    ServeCluster,
    Stream,
    http_json,
    prompt_token_ids,
    wait_for,
)

DECODERS = ("decode-0", "decode-1")


def only_request(cluster: ServeCluster) -> tuple[str, str]:
    wait_for(lambda: len(cluster.placed()) == 1, 120, "the request to be placed")
    return next(iter(cluster.placed().items()))


def migrate(cluster: ServeCluster, key: str, target: str) -> dict[str, Any]:
    status, result = http_json(
        cluster.url + "/admin/migrate", {"request_key": key, "target": target}, timeout=300
    )
    assert status == 200, result
    return result


def other(instance: str) -> str:
    return DECODERS[1 - DECODERS.index(instance)]


@pytest.fixture(autouse=True)
def idle(cluster: ServeCluster) -> None:
    wait_for(lambda: not cluster.placed(), 120, "no request in flight")
    wait_for(cluster.all_kv_free, 60, "an idle cluster")


def test_migration_mid_stream_keeps_the_output(cluster: ServeCluster, reference: PlainVLLM) -> None:
    prompt = prompt_token_ids(300, seed=31)
    stream = Stream(cluster.url, prompt, max_tokens=120)
    key, source = only_request(cluster)
    wait_for(lambda: len(stream.tokens) >= 40, 300, "40 tokens on the first instance")
    result = migrate(cluster, key, other(source))
    assert result["status"] == "completed", result
    assert result["stages"] >= 1 and result["precopied_blocks"] >= 2
    assert result["downtime_s"] is not None
    stream.wait()
    assert stream.error is None, stream.error
    expected = reference.complete(prompt, 120, ignore_eos=True)["choices"][0]["token_ids"]
    assert stream.tokens == expected, "migration changed the output"
    assert stream.finish_reason == "length"
    cluster.assert_no_leaks()


def test_several_migrations_in_a_row(cluster: ServeCluster, reference: PlainVLLM) -> None:
    prompt = prompt_token_ids(200, seed=32)
    stream = Stream(cluster.url, prompt, max_tokens=150)
    key, instance = only_request(cluster)
    for hop in range(3):
        wait_for(lambda h=hop: len(stream.tokens) >= 25 * (h + 1), 300, "more tokens")
        result = migrate(cluster, key, other(instance))
        assert result["status"] == "completed", result
        instance = other(instance)
    stream.wait()
    assert stream.error is None, stream.error
    expected = reference.complete(prompt, 150, ignore_eos=True)["choices"][0]["token_ids"]
    assert stream.tokens == expected
    cluster.assert_no_leaks()


def test_drain_moves_every_stream_off_an_instance(
    cluster: ServeCluster, reference: PlainVLLM
) -> None:
    prompts = [prompt_token_ids(120 + 10 * i, seed=40 + i) for i in range(8)]
    streams = [Stream(cluster.url, p, max_tokens=60) for p in prompts]
    wait_for(
        lambda: len(cluster.placed()) == 8 and all(len(s.tokens) >= 3 for s in streams),
        300,
        "8 streams to be running",
    )
    counts: dict[str, int] = {}
    for instance in cluster.placed().values():
        counts[instance] = counts.get(instance, 0) + 1
    drained = max(DECODERS, key=lambda d: counts.get(d, 0))
    try:
        status, answer = http_json(f"{cluster.url}/admin/instances/{drained}/drain", {})
        assert status == 200 and answer["moving"] == counts[drained]
        wait_for(lambda: drained not in cluster.placed().values(), 300, "the instance to empty")
        for s in streams:
            s.wait()
    finally:
        http_json(f"{cluster.url}/admin/instances/{drained}/undrain", {})
    with cf.ThreadPoolExecutor(2) as pool:
        expected = list(
            pool.map(
                lambda p: reference.complete(p, 60, ignore_eos=True)["choices"][0]["token_ids"],
                prompts,
            )
        )
    for s, want in zip(streams, expected, strict=True):
        assert s.error is None, s.error
        assert s.tokens == want
    status, migrations = http_json(cluster.url + "/admin/migrations")
    recent = migrations["recent"][-counts[drained] :]
    assert all(m["status"] == "completed" for m in recent), recent
    cluster.assert_no_leaks()


def test_client_leaving_during_migration_leaves_no_blocks(cluster: ServeCluster) -> None:
    prompt = prompt_token_ids(900, seed=33)
    stream = Stream(cluster.url, prompt, max_tokens=400)
    key, source = only_request(cluster)
    wait_for(lambda: len(stream.tokens) >= 10, 300, "tokens")
    # Make the pre-copy pull stall, so that the client is gone while the migration runs.
    cluster.inject_pull_delay(source, delay_s=3.0)
    moving = threading.Thread(
        target=lambda: http_json(
            cluster.url + "/admin/migrate",
            {"request_key": key, "target": other(source)},
            timeout=300,
        )
    )
    moving.start()
    time.sleep(1.0)
    stream.close()
    moving.join(120)
    wait_for(lambda: not cluster.placed(), 60, "the request to be gone")
    cluster.assert_no_leaks()
