"""Prometheus metrics of the gateway: its own requests, plus the cluster as last reported."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pdserve.gateway.control_plane import ControlPlane
from pdserve.protocol.reports import Role
from pdserve.scheduler.dispatch import Dispatch


class DispatchMode(enum.StrEnum):
    """How a request was placed (``pdserve_dispatches{mode}``)."""

    DISAGGREGATED = "disaggregated"  # prefilled on one instance, decoded on another
    LOCAL = "local"  # whole on a decode-capable instance
    FALLBACK = "fallback"  # whole on a prefill instance: no decode-capable one was usable


def dispatch_mode(choice: Dispatch, role: Role | None) -> DispatchMode:
    """``role``: that of the instance the request runs whole on (``choice.decode``)."""
    if choice.prefill is not None:
        return DispatchMode.DISAGGREGATED
    return DispatchMode.FALLBACK if role == "prefill" else DispatchMode.LOCAL


class Refusal(enum.StrEnum):
    """Why a request was refused before any instance saw it (``pdserve_refused_requests``)."""

    QUEUE_FULL = "queue_full"  # 429: --max-queued requests already wait for a slot
    OVER_SLO = "over_slo"  # 429: --shed-over-slo, no instance predicted to meet its TTFT SLO
    NO_INSTANCE = "no_instance"  # 503: no usable instance at all


_LATENCY = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1,
    1.5,
    2,
    3,
    5,
    7.5,
    10,
    15,
    20,
    30,
    60,
)


class ClusterCollector(Collector):
    """Per-instance load and KV transfer counters, read from the control plane at scrape."""

    def __init__(self, control: Callable[[], ControlPlane | None]) -> None:
        self._control = control

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        control = self._control()
        if control is None:
            return
        labels = ["instance", "role"]
        healthy = GaugeMetricFamily(
            "pdserve_instance_healthy", "1 if the instance is in rotation", labels=labels
        )
        running = GaugeMetricFamily(
            "pdserve_instance_running_requests", "running requests", labels=labels
        )
        waiting = GaugeMetricFamily(
            "pdserve_instance_waiting_requests", "waiting requests", labels=labels
        )
        usage = GaugeMetricFamily(
            "pdserve_instance_kv_usage", "fraction of KV blocks in use", labels=labels
        )
        loads = CounterMetricFamily(
            "pdserve_kv_loads", "KV pulls by result", labels=[*labels, "result"]
        )
        received = CounterMetricFamily(
            "pdserve_kv_received_bytes", "KV bytes pulled in", labels=labels
        )
        seconds = CounterMetricFamily(
            "pdserve_kv_load_seconds", "time spent pulling KV", labels=labels
        )
        pairs = CounterMetricFamily(
            "pdserve_kv_pairs_opened", "process groups formed", labels=labels
        )
        setup = CounterMetricFamily(
            "pdserve_kv_pair_setup_seconds", "time forming process groups", labels=labels
        )
        expired = CounterMetricFamily(
            "pdserve_kv_leases_expired", "exports freed unpulled", labels=labels
        )
        held = GaugeMetricFamily(
            "pdserve_kv_held_exports", "exports waiting for a pull or pinned", labels=labels
        )
        open_pairs = GaugeMetricFamily(
            "pdserve_kv_open_pairs", "process-group pairs alive", labels=labels
        )
        inflight = GaugeMetricFamily(
            "pdserve_kv_inflight_pulls", "KV transfers running (served and made)", labels=labels
        )
        for instance_id, record in control.instances.items():
            key = [instance_id, record.info.role]
            healthy.add_metric(key, 1.0 if record.healthy else 0.0)
            load = record.load
            if load is None:
                continue
            running.add_metric(key, load.num_running)
            waiting.add_metric(key, load.num_waiting)
            total = max(1, load.total_blocks)
            usage.add_metric(key, 1.0 - load.free_blocks / total)
            t = load.transfers
            loads.add_metric([*key, "ok"], t.loads_ok)
            loads.add_metric([*key, "failed"], t.loads_failed)
            received.add_metric(key, t.bytes_received)
            seconds.add_metric(key, t.load_seconds)
            pairs.add_metric(key, t.pairs_opened)
            setup.add_metric(key, t.pair_setup_seconds)
            expired.add_metric(key, t.leases_expired)
            holdings = record.holdings()
            held.add_metric(key, holdings.held_exports)
            open_pairs.add_metric(key, holdings.open_pairs)
            inflight.add_metric(key, holdings.inflight_pulls)
        yield from (
            healthy,
            running,
            waiting,
            usage,
            loads,
            received,
            seconds,
            pairs,
            setup,
            expired,
            held,
            open_pairs,
            inflight,
        )


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

        def latency(name: str, documentation: str) -> Histogram:
            return Histogram(name, documentation, buckets=_LATENCY, registry=r)

        self.requests = Counter(
            "pdserve_requests",
            "requests by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.ttft_seconds = latency(
            "pdserve_time_to_first_token_seconds", "arrival at the gateway to first token"
        )
        self.itl_seconds = latency(
            "pdserve_inter_token_latency_seconds", "gap between consecutive token chunks"
        )
        self.e2e_seconds = latency("pdserve_e2e_request_latency_seconds", "arrival to last token")
        self.prefill_seconds = latency(
            "pdserve_prefill_leg_seconds", "prefill leg on a prefill instance"
        )
        self.held_for_room_seconds = latency(
            "pdserve_held_for_decode_room_seconds",
            "time a request waited at the gateway because every decode instance was full",
        )
        self.held_requests = Gauge(
            "pdserve_held_requests",
            "requests the gateway holds now, waiting for decode room or briefly silent instances",
            registry=r,
        )
        self.refused = Counter(
            "pdserve_refused_requests",
            "requests refused before any instance saw them, by reason "
            "(queue_full, over_slo, no_instance)",
            ["reason"],
            registry=r,
        )
        self.dispatches = Counter(
            "pdserve_dispatches",
            "placements by mode (disaggregated, local, fallback: whole on a prefill instance)",
            ["mode"],
            registry=r,
        )
        self.failovers = Counter(
            "pdserve_failovers", "requests continued after an instance failed", registry=r
        )
        self.migrations = Counter(
            "pdserve_migrations",
            "live migrations by result (started, completed, aborted)",
            ["result"],
            registry=r,
        )
        self.migration_downtime_seconds = latency(
            "pdserve_migration_downtime_seconds", "gap in the token stream at a migration's cut"
        )
        self.migration_seconds = latency(
            "pdserve_migration_seconds", "a migration from pin to the first token on the target"
        )
        self.migration_bytes = Counter(
            "pdserve_migration_bytes",
            "KV bytes moved by migrations (pre-copies and tails)",
            registry=r,
        )
        self.inflight = Gauge("pdserve_inflight_requests", "requests being served", registry=r)
        self.queued = Gauge("pdserve_queued_requests", "requests waiting for a slot", registry=r)
        self.phase_seconds = Histogram(
            "pdserve_request_phase_seconds",
            "time to first token by phase (tokenize, queue, prefill, kv_transfer, "
            "first_decode; see pdserve/gateway/phases.py), one observation per prompt",
            ["phase"],
            buckets=(0.0005, 0.001, 0.0025, *_LATENCY),
            registry=r,
        )
        self.prompt_counts = Counter(
            "pdserve_prompt_counts",
            "requests by how their prompt tokens were counted (token_ids, tokenized, "
            "estimated) and why one was estimated (fallback; none when not)",
            ["method", "fallback"],
            registry=r,
        )
        self.tokenizer_checks = Counter(
            "pdserve_tokenizer_checks",
            "the gateway's prompt token ids compared with an instance's, by kind and result "
            "(match, mismatch: that kind is estimated from then on)",
            ["kind", "result"],
            registry=r,
        )
        self._control: ControlPlane | None = None
        r.register(ClusterCollector(lambda: self._control))

    def watch(self, control: ControlPlane) -> None:
        self._control = control
        self.held_requests.set_function(lambda: float(control.held_requests))
