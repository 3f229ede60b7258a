"""Where a new request's prefill and decode run.

``PdPolicy`` (the default) follows DistServe/Llumnix:

- decode goes to the decode-capable instance with the most *freeness*: KV blocks left after
  the queued demand (free − watermark − blocks wanted by waiting and just-sent requests),
  per request;
- prefill goes to the prefill instance with the least estimated wait (queued prompt tokens
  divided by its measured prefill rate);
- adaptively, a short prompt, or one that would wait long for a saturated prefill pool while
  the decode instance has its own prefill capacity free, is prefilled on the decode instance;
- a ``both`` instance chosen for decode serves the whole request.

``RoundRobinPolicy`` and ``LeastRequestsPolicy`` are the baselines the benchmarks compare to.
``cache-aware`` (``pdserve.scheduler.cache_aware``) chooses prefill and decode together by
the predicted TTFT with each instance's cached prefix (the control plane hands it the
request's ``PrefixMatch``: ``PrefixAwarePolicy``).
``router-cache-aware`` (``pdserve.scheduler.router_cache_aware``) is vllm-router's
``cache_aware`` re-created, the baseline the simulator compares ``cache-aware`` to at scale.
``adaptive`` (``pdserve.scheduler.adaptive``) treats roles as preferences and places each
request against the SLOs (``DispatchSettings.slo``).

Roles are preferences, not limits: every instance runs the same KV connector (``kv_both``) and
can serve a whole request. When no decode-capable instance is usable (a ``--decode 0``
cluster, decode instances not joined yet or gone), every policy serves the request whole on
the best usable instance of any role (``whole_on_any``), so ``NoInstance`` means that no
instance at all is usable.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from pdserve.scheduler.adaptive import AdaptivePolicy
from pdserve.scheduler.admission import prefill_wait_s
from pdserve.scheduler.cache_aware import CacheAwarePolicy, CacheAwareSettings
from pdserve.scheduler.prefix_index import NO_MATCH, PrefixMatch, PrefixTracking
from pdserve.scheduler.rescheduling import MigrationPlan
from pdserve.scheduler.router_cache_aware import RouterCacheAwarePolicy, RouterCacheAwareSettings
from pdserve.scheduler.slo import SloSettings
from pdserve.scheduler.snapshot import (
    POOLS,
    ClusterSnapshot,
    InstanceView,
    PoolName,
    Ranking,
    RequestEstimate,
)

PolicyName = Literal[
    "pd", "round-robin", "least-requests", "adaptive", "cache-aware", "router-cache-aware"
]


class DispatchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: PolicyName = Field(
        "pd",
        description="dispatch policy: pd, round-robin, least-requests, adaptive, cache-aware, "
        "router-cache-aware",
    )
    short_prompt_tokens: int = Field(
        64, ge=0, description="prompts up to this many tokens are prefilled on the decode instance"
    )
    prefill_saturation_s: float = Field(
        2.0,
        ge=0,
        description="estimated prefill wait above which a decode instance with a "
        "shorter queue prefills the request itself",
    )
    watermark: float = Field(
        0.01, ge=0, lt=1, description="fraction of KV blocks kept free when judging decode capacity"
    )
    priority_kv_reserve: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="fraction of each decode instance's KV blocks that only high-priority "
        "requests (a vLLM priority below 0) may take when their KV is pulled there; normal "
        "ones wait at the gateway instead (pd, adaptive, cache-aware; 0: no reserve)",
    )
    default_prefill_tokens_per_s: float = Field(
        2000.0, gt=0, description="prefill rate assumed until an instance has measured its own"
    )
    slo: SloSettings = Field(default_factory=SloSettings)
    cache: CacheAwareSettings = Field(default_factory=CacheAwareSettings)
    router: RouterCacheAwareSettings = Field(default_factory=RouterCacheAwareSettings)


@dataclass(frozen=True)
class Dispatch:
    """``decode``: the instance that produces the output tokens (of any role when no
    decode-capable instance is usable); ``prefill`` None: it prefills the request itself.
    ``cached_tokens``: prompt tokens the instance that prefills holds already in its prefix
    cache, as the policy predicted (only ``cache-aware`` says): its pending work is the rest."""

    decode: str
    prefill: str | None = None
    cached_tokens: int = 0

    @property
    def disaggregated(self) -> bool:
        return self.prefill is not None


class NoInstance(Exception):
    """No instance is usable at all (the gateway answers 503): a missing role alone never
    raises it (``whole_on_any``)."""

    def __init__(self, role: str = "serve the request") -> None:
        super().__init__(f"no healthy instance can {role}")
        self.role = role


def whole_on_any(snapshot: ClusterSnapshot, ranking: Ranking) -> Dispatch:
    """The fallback of every policy when no decode-capable instance is usable: the request
    runs whole on the best usable instance of any role (``ranking`` over the ``any`` pool).

    A 503 would turn away requests a prefill instance can serve: every instance has the same
    connector and vLLM engine, the role only says what the policies prefer it for.
    """
    best = snapshot.best(ranking)
    if best is None:
        raise NoInstance()
    return Dispatch(decode=best.instance_id)


class Serving(enum.StrEnum):
    """What the usable instances can serve now (``/health`` says it)."""

    DISAGGREGATED = "disaggregated"  # prefill instances and decode-capable ones
    COLOCATED_ONLY = "colocated-only"  # every request runs whole on one instance
    NONE = "none"  # no usable instance: requests get 503


def serving(snapshot: ClusterSnapshot) -> Serving:
    if not snapshot.pool("any"):
        return Serving.NONE
    if snapshot.pool("prefill") and snapshot.pool("decode"):
        return Serving.DISAGGREGATED
    return Serving.COLOCATED_ONLY


class NoCapacity(Exception):
    """Every decode instance is full: hold the request until a load report shows room.

    Prefilling it now would leave its KV exported on the prefill instance, waiting for a
    decode slot, until the export's lease ran out and the decode instance recomputed it
    (fault 8 of the KV audit). The gateway holds it instead (``--admission-wait-s``) and
    asks again; the simulator does the same.
    """

    def __init__(self, decode: str, need_blocks: int, free_blocks: int) -> None:
        super().__init__(
            f"decode instance {decode} has {free_blocks} free KV blocks, the request needs "
            f"{need_blocks}"
        )
        self.decode = decode
        self.need_blocks = need_blocks
        self.free_blocks = free_blocks


class DispatchPolicy(Protocol):
    def choose(self, snapshot: ClusterSnapshot, request: RequestEstimate) -> Dispatch: ...


@runtime_checkable
class DescribedPolicy(Protocol):
    """A policy with learnt state worth showing (``GET /admin/policy``)."""

    def describe(self, snapshot: ClusterSnapshot) -> dict[str, Any]: ...


@runtime_checkable
class PrefixAwarePolicy(Protocol):
    """A policy that also reads where the request's prefix is cached: the control plane
    matches the prompt in its prefix index only for such a policy, and keeps the index as
    its ``tracking`` says."""

    tracking: PrefixTracking

    def choose(self, snapshot: ClusterSnapshot, request: RequestEstimate) -> Dispatch: ...

    def choose_cached(
        self, snapshot: ClusterSnapshot, request: RequestEstimate, prefix: PrefixMatch
    ) -> Dispatch: ...


class PdPolicy:
    def __init__(self, settings: DispatchSettings) -> None:
        self.settings = settings
        # max(freeness, then fewer requests) as a minimum: the snapshot keeps minima ready.
        self.decode_ranking = Ranking("decode", self.decode_key)
        self.prefill_ranking = Ranking("prefill", self.prefill_key)
        # Without a decode-capable instance: the shortest prefill wait serves it whole.
        self.fallback_ranking = Ranking("any", self.prefill_key)

    def prefill_wait_s(self, view: InstanceView) -> float:
        return prefill_wait_s(view, self.settings.default_prefill_tokens_per_s)

    def decode_key(self, view: InstanceView) -> tuple[float, int]:
        """Lowest first: the most freeness, then the fewest requests."""
        return -view.freeness(self.settings.watermark), view.num_requests

    def prefill_key(self, view: InstanceView) -> tuple[float, int]:
        return self.prefill_wait_s(view), view.num_requests

    def choose_decode(self, candidates: Sequence[InstanceView]) -> InstanceView:
        return min(candidates, key=self.decode_key)

    def choose_prefill(self, candidates: Sequence[InstanceView]) -> InstanceView:
        return min(candidates, key=self.prefill_key)

    def choose(self, snapshot: ClusterSnapshot, request: RequestEstimate) -> Dispatch:
        decode = snapshot.best(self.decode_ranking)
        if decode is None:
            return whole_on_any(snapshot, self.fallback_ranking)
        if decode.role == "both" or request.prompt_tokens <= self.settings.short_prompt_tokens:
            return Dispatch(decode=decode.instance_id)
        prefill = snapshot.best(self.prefill_ranking)
        if prefill is None:
            return Dispatch(decode=decode.instance_id)
        wait = self.prefill_wait_s(prefill)
        if wait > self.settings.prefill_saturation_s and self.prefill_wait_s(decode) < wait:
            return Dispatch(decode=decode.instance_id)
        check_room(decode, request, self.settings)
        return Dispatch(decode=decode.instance_id, prefill=prefill.instance_id)


def check_room(decode: InstanceView, request: RequestEstimate, settings: DispatchSettings) -> None:
    """Raises ``NoCapacity`` when the decode instance cannot take the request's KV.

    Only for a disaggregated placement (a colocated request waits in the instance's own
    queue, holding nothing elsewhere), and only for a request that fits an empty
    instance: a larger one waits nowhere better.

    A normal request also leaves ``priority_kv_reserve`` of the blocks free, so that a
    high-priority one arriving while the instance is full of normal decodes is pulled there
    at once instead of waiting for them to end (vLLM's priority scheduling orders only the
    instance's own queue, and a pulled request's blocks are allocated as it arrives). A
    normal request too large for the blocks outside the reserve may use it: it would wait
    for ever otherwise. The ``pd``, ``adaptive`` and ``cache-aware`` policies call it; the
    baselines (round-robin, least-requests, router-cache-aware) check no room.
    """
    load = decode.load
    if load is None:
        return
    need = request.prompt_blocks(decode.block_size)
    kept = settings.watermark
    normal_kept = kept + settings.priority_kv_reserve
    if request.priority <= 0 and need <= _capacity(load.total_blocks, normal_kept):
        kept = normal_kept
    free = decode.virtual_free_blocks(kept)
    if need > free and need <= _capacity(load.total_blocks, kept):
        raise NoCapacity(decode.instance_id, need, free)


def _capacity(total_blocks: int, kept: float) -> int:
    """Blocks an empty instance offers when the fraction ``kept`` stays free."""
    return total_blocks - int(kept * total_blocks)


class AdaptiveDispatch:
    """``pdserve.scheduler.adaptive``'s placements as dispatch decisions (and its
    rescheduling, which the migrators call through ``rescheduling.plan_round``)."""

    def __init__(self, settings: DispatchSettings) -> None:
        self.settings = settings
        self.adaptive = AdaptivePolicy(settings.slo, settings.default_prefill_tokens_per_s)

    def choose(self, snapshot: ClusterSnapshot, request: RequestEstimate) -> Dispatch:
        placement = self.adaptive.place(snapshot, request)
        if placement is None:
            raise NoInstance("decode")
        if placement.prefill is not None:
            decode = snapshot.get(placement.decode)
            assert decode is not None
            check_room(decode, request, self.settings)
        return Dispatch(decode=placement.decode, prefill=placement.prefill)

    def plan_migrations(
        self,
        snapshot: ClusterSnapshot,
        moving: Collection[str],
        preempted: Mapping[str, bool],
        budget: int,
    ) -> list[MigrationPlan]:
        return self.adaptive.plan_migrations(snapshot, moving, preempted, budget)

    def describe(self, snapshot: ClusterSnapshot) -> dict[str, Any]:
        return self.adaptive.describe(snapshot)


class CacheAwareDispatch:
    """``pdserve.scheduler.cache_aware``'s placements as dispatch decisions; without a
    match (``choose``) it prices every instance as holding nothing."""

    def __init__(self, settings: DispatchSettings) -> None:
        self.settings = settings
        # From the instances' KV events; routed prompts only for those that send none.
        self.tracking = PrefixTracking(
            kv_events=True,
            approximate_ttl_s=settings.cache.approximate_ttl_s,
            approximate_max_blocks=settings.cache.approximate_max_blocks,
            bounded_by_capacity=True,
        )
        self.cache = CacheAwarePolicy(
            settings.cache,
            settings.watermark,
            settings.default_prefill_tokens_per_s,
            settings.short_prompt_tokens,
            settings.prefill_saturation_s,
        )

    def choose(self, snapshot: ClusterSnapshot, request: RequestEstimate) -> Dispatch:
        return self.choose_cached(snapshot, request, NO_MATCH)

    def choose_cached(
        self, snapshot: ClusterSnapshot, request: RequestEstimate, prefix: PrefixMatch
    ) -> Dispatch:
        placement = self.cache.place(snapshot, request, prefix)
        if placement is None:
            raise NoInstance()
        if placement.prefill is not None:
            decode = snapshot.get(placement.decode)
            assert decode is not None
            check_room(decode, request, self.settings)
        return Dispatch(placement.decode, placement.prefill, placement.cached_tokens)


class RouterCacheAwareDispatch:
    """``pdserve.scheduler.router_cache_aware``'s choices as dispatch decisions: its index is
    only what it routed (``tracking``), its ``cached_tokens`` 0 (it predicts no TTFT)."""

    def __init__(self, settings: DispatchSettings) -> None:
        self.router = RouterCacheAwarePolicy(settings.router)
        self.tracking = self.router.tracking

    def choose(self, snapshot: ClusterSnapshot, request: RequestEstimate) -> Dispatch:
        return self.choose_cached(snapshot, request, NO_MATCH)

    def choose_cached(
        self, snapshot: ClusterSnapshot, request: RequestEstimate, prefix: PrefixMatch
    ) -> Dispatch:
        placed = self.router.place(snapshot, request, prefix)
        if placed is None:
            raise NoInstance()
        decode, prefill = placed
        return Dispatch(decode=decode, prefill=prefill)


class RoundRobinPolicy:
    """Takes turns, blind to load: the usual proxy in front of vLLM instances."""

    def __init__(self) -> None:
        # One turn counter per pool: a shared one would skip decoders in step with prefillers.
        self._turns = {pool: itertools.count() for pool in POOLS}

    def _next(self, snapshot: ClusterSnapshot, pool: PoolName) -> InstanceView | None:
        ids = snapshot.ids(pool)  # in the order of their ids
        if not ids:
            return None
        return snapshot.get(ids[next(self._turns[pool]) % len(ids)])

    def choose(self, snapshot: ClusterSnapshot, request: RequestEstimate) -> Dispatch:
        decode = self._next(snapshot, "decode")
        if decode is None:
            decode = self._next(snapshot, "any")  # the fallback: ``whole_on_any``, in turns
            if decode is None:
                raise NoInstance()
            return Dispatch(decode=decode.instance_id)
        if decode.role == "both" or not snapshot.ids("prefill"):
            return Dispatch(decode=decode.instance_id)
        prefill = self._next(snapshot, "prefill")
        assert prefill is not None
        return Dispatch(decode=decode.instance_id, prefill=prefill.instance_id)


def _fewest_requests(view: InstanceView) -> tuple[int, str]:
    return view.num_requests, view.instance_id


class LeastRequestsPolicy:
    """Fewest running + waiting requests: load-aware, but blind to memory and prompt sizes."""

    decode_ranking = Ranking("decode", _fewest_requests)
    prefill_ranking = Ranking("prefill", _fewest_requests)
    fallback_ranking = Ranking("any", _fewest_requests)

    def choose(self, snapshot: ClusterSnapshot, request: RequestEstimate) -> Dispatch:
        decode = snapshot.best(self.decode_ranking)
        if decode is None:
            return whole_on_any(snapshot, self.fallback_ranking)
        prefill = None if decode.role == "both" else snapshot.best(self.prefill_ranking)
        if prefill is None:
            return Dispatch(decode=decode.instance_id)
        return Dispatch(decode=decode.instance_id, prefill=prefill.instance_id)


def make_policy(settings: DispatchSettings) -> DispatchPolicy:
    if settings.policy == "round-robin":
        return RoundRobinPolicy()
    if settings.policy == "least-requests":
        return LeastRequestsPolicy()
    if settings.policy == "adaptive":
        return AdaptiveDispatch(settings)
    if settings.policy == "cache-aware":
        return CacheAwareDispatch(settings)
    if settings.policy == "router-cache-aware":
        return RouterCacheAwareDispatch(settings)
    return PdPolicy(settings)
