"""Prefix-cache hits and KV bytes moved over a load point, from the servers' own counters.

Every vLLM instance counts, in tokens, what its prefix cache was asked for and what it found
(``vllm:prefix_cache_queries`` and ``vllm:prefix_cache_hits``, exposed with prometheus'
``_total``); pdserve's gateway exposes the KV bytes each instance pulled from another
(``pdserve_kv_received_bytes``, from the instances' load reports). They are read before and
after a point, and the differences, summed over the instances, are the point's
``CacheStats``. Behind a pdserve gateway every instance of ``/admin/instances`` is read; a
plain vLLM server is its own only instance; a router (vllm-router) exposes neither, so
``pdserve bench compare`` reads its instances directly (``RunningSetup.counters``).

In a disaggregated cluster both instances of a request look it up (the decode instance
finds what it already holds before pulling the rest), so the hit rate is over both lookups.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from benchmark.local_cluster import instances
from benchmark.setups import GATEWAY_COUNTERS, VLLM_COUNTERS, fetch_text, metric_total
from pdserve.workload.metrics import CacheStats

# The keys of the counters, as ``RunningSetup.counters`` and results.json name them.
HITS, QUERIES, KV_BYTES = "prefix_cache_hits", "prefix_cache_queries", "kv_received_bytes"
PREFIX_CACHE_HITS = VLLM_COUNTERS[HITS][0]
PREFIX_CACHE_QUERIES = VLLM_COUNTERS[QUERIES][0]
KV_RECEIVED_BYTES = GATEWAY_COUNTERS[KV_BYTES][0]


@dataclass(frozen=True)
class Sources:
    """Where a point's counters are read: vLLM instances, and a pdserve gateway if any."""

    instances: tuple[str, ...]
    gateway: str | None = None


def discover(url: str, api_key: str | None = None) -> Sources:
    """A pdserve gateway's instances (and the gateway), or the server at ``url`` alone."""
    base = url.rstrip("/").removesuffix("/v1")
    rows = instances(base, api_key, timeout=2.0)
    urls = tuple(str(r["url"]) for r in rows if r.get("url"))
    if urls:
        return Sources(urls, base)
    return Sources((base,))


def summed(texts: Sequence[str | None], name: str) -> float | None:
    """One counter summed over every instance; None unless every instance has it."""
    values = [metric_total(t, name) if t else None for t in texts]
    if not values or any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)


def scrape(sources: Sources) -> dict[str, float]:
    """The counters now (those some source lacks are left out)."""
    texts = [fetch_text(url + "/metrics") for url in sources.instances]
    found = {
        key: value
        for key, name in ((HITS, PREFIX_CACHE_HITS), (QUERIES, PREFIX_CACHE_QUERIES))
        if (value := summed(texts, name)) is not None
    }
    if sources.gateway is not None:
        text = fetch_text(sources.gateway + "/metrics")
        # A gateway whose instances moved nothing yet may not list the counter: 0.
        found[KV_BYTES] = (metric_total(text, KV_RECEIVED_BYTES) if text else None) or 0.0
    return found


def cache_stats(before: Mapping[str, float], after: Mapping[str, float]) -> CacheStats | None:
    """What the point counted (None: no counter could be read at both ends)."""

    def delta(key: str) -> float | None:
        return after[key] - before[key] if key in before and key in after else None

    queries, hits, moved = delta(QUERIES), delta(HITS), delta(KV_BYTES)
    if queries is None and hits is None and moved is None:
        return None
    return CacheStats.of(queries, hits, moved)
