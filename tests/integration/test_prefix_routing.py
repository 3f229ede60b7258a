"""Cache-aware routing on real vLLM (issue 14): instances relay their KV events, the gateway
indexes them, and a request sharing a 1000-token prefix with an earlier one is prefilled
where that prefix is cached, which vLLM's own prefix-cache hit counter shows.

A cluster of its own: ``--prefill 2 --decode 1 --policy cache-aware`` (about a minute to
start on a CPU machine). With two prefill instances, one of them never sees the first
request: the second request must not go there. The same cluster shows a disaggregated
request's time to first token broken down by phase (``gateway.phases``).
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import (
    MODEL,
    ServeCluster,
    http_json,
    prompt_token_ids,
    vllm_metric,
    wait_for,
)

HITS = "vllm:prefix_cache_hits_total"
QUERIES = "vllm:prefix_cache_queries_total"
PREFIX = 1000


@pytest.fixture(scope="module")
def cache_aware(logs: Path) -> Iterator[ServeCluster]:
    served = ServeCluster.start(
        logs / "cache-aware",
        *"--prefill 2 --decode 1 --policy cache-aware --kv-cache-gib 1".split(),
        expected=3,
    )
    try:
        served.wait()
        yield served
    finally:
        served.process.stop(grace_s=20)


def counters(cluster: ServeCluster) -> dict[str, tuple[float, float]]:
    """(prefix-cache hits, queries) of every instance, in tokens (vLLM's own counters)."""
    return {
        row["id"]: (vllm_metric(row["url"], HITS), vllm_metric(row["url"], QUERIES))
        for row in cluster.instances()
    }


def complete(cluster: ServeCluster, prompt: list[int]) -> dict[str, object]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    status, answer = http_json(cluster.url + "/v1/completions", body)
    assert status == 200, answer
    return answer


def test_a_shared_prefix_is_prefilled_where_it_is_cached(cache_aware: ServeCluster) -> None:
    prefix = prompt_token_ids(PREFIX)
    first = prefix + prompt_token_ids(40, seed=1)
    second = prefix + prompt_token_ids(40, seed=2)
    rows = {row["id"]: row for row in cache_aware.instances()}
    block_size = next(r["block_size"] for r in rows.values() if r["block_size"])
    cached_blocks = PREFIX // block_size
    assert cached_blocks > 0

    before, bytes_before = counters(cache_aware), cache_aware.kv_bytes_received()
    complete(cache_aware, first)
    after_first = counters(cache_aware)
    # The prefill instance that computed it and the decode instance hold it now.
    holders = {i for i in rows if after_first[i][1] > before[i][1]}
    others = [i for i, r in rows.items() if r["role"] == "prefill" and i not in holders]
    assert others, f"every prefill instance saw the first request: {holders}"

    def indexed() -> bool:
        found = {r["id"]: r for r in cache_aware.instances()}
        return all(
            found[i]["prefix_tracking"] == "exact" and found[i]["prefix_blocks"] >= cached_blocks
            for i in holders
        )

    wait_for(indexed, 30, "the holders' prefix events to reach the gateway")
    bytes_first = cache_aware.kv_bytes_received()

    complete(cache_aware, second)
    after = counters(cache_aware)
    for other in others:
        assert after[other] == after_first[other], f"{other}, without the prefix, saw it"
    rose = {i: after[i][0] - after_first[i][0] for i in holders}
    # Whoever computed the second prompt (the prefill holder, or the decode holder computing
    # the small uncached part itself) found the shared prefix in its cache.
    assert max(rose.values()) >= cached_blocks * block_size, rose
    # The decode instance pulled only what it lacked (nothing if it computed the rest).
    bytes_second = cache_aware.kv_bytes_received()
    decode = next(i for i, r in rows.items() if r["role"] == "decode")
    first_pull = bytes_first[decode] - bytes_before[decode]
    second_pull = bytes_second[decode] - bytes_first[decode]
    assert first_pull > 0 and second_pull < first_pull, (first_pull, second_pull)


PHASES = {"tokenize", "queue", "prefill", "kv_transfer", "first_decode"}


def phase_counts(cluster: ServeCluster) -> dict[str, float]:
    """``pdserve_request_phase_seconds_count`` per phase, from the gateway's /metrics."""
    with urllib.request.urlopen(cluster.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = re.compile(r'^pdserve_request_phase_seconds_count\{phase="([a-z_]+)"\} (\S+)$', re.M)
    return {phase: float(value) for phase, value in pattern.findall(text)}


def test_the_time_to_first_token_is_broken_down_by_phase(cache_aware: ServeCluster) -> None:
    """A disaggregated request's phases, in /admin/requests and in the histogram, add up to
    its time to first token (``gateway.phases``)."""
    before = phase_counts(cache_aware)
    complete(cache_aware, prompt_token_ids(300, seed=3))  # fresh: prefilled on a prefill one
    status, rows = http_json(cache_aware.url + "/admin/requests?recent=1", timeout=10)
    assert status == 200 and rows, rows
    row = rows[0]
    phases = row["phases_s"]
    assert set(phases) == PHASES, row
    assert all(seconds >= 0 for seconds in phases.values()), row
    assert row["ttft_s"] > 0 and phases["prefill"] > 0, row
    assert abs(sum(phases.values()) - row["ttft_s"]) < 0.01, row
    after = phase_counts(cache_aware)
    assert {p for p in PHASES if after.get(p, 0) - before.get(p, 0) == 1} == PHASES, after
