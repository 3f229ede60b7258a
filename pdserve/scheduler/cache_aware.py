"""Cache-aware dispatch: prefill and decode chosen together, cached prefix priced with load.

The policy ``cache-aware`` (``DispatchSettings.policy``; ``pdserve.scheduler.dispatch`` wraps
this module as ``CacheAwareDispatch``) gets the snapshot and the request's ``PrefixMatch``
(prompt tokens each instance already holds in its prefix cache,
``pdserve.scheduler.prefix_index``) and chooses the prefill and the decode instance
*together*: of every pair it considers it takes the one of least predicted

    TTFT(p, d) = (queued prompt tokens on p + uncached prompt tokens on p) / prefill rate of p
                 + (prompt tokens d does not hold) / transfer rate           (p != d)
    TTFT(d, d) = (queued prompt tokens on d + uncached prompt tokens on d) / prefill rate of d

The prefill rate is each instance's measured one (``LoadReport.prefill_tokens_per_s``, the
default until it has one, as ``admission.prefill_wait_s``); the transfer rate is
``--cache-transfer-tokens-per-s``. The decode instance's connector pulls only the blocks past
its own prefix-cache hit (``pdserve.kv.scheduler_side``: ``get_num_new_matched_tokens`` is
given the local hit, the pull starts after it), so a decode instance that holds the prefix
cuts the bytes moved, and the formula prices exactly that.

The pairs considered (a few, not every pair: O(holders) per request):

- decode: the instance ``pd`` would choose (most free KV blocks per request), and every
  decode-capable *holder* of the prefix that stays within the *decode balance*: room for the
  request's blocks and free blocks per request at least ``--cache-decode-balance`` times the
  best instance's. Beyond that the holder is saturated and the prefix spreads to the best
  instance (which then holds it too);
- prefill: the prefill instance of least queue wait (``pd``'s choice) and every prefill
  instance holding the prefix;
- colocated, on the decode instance itself: always for a ``both`` instance (it prefills what
  it decodes, as under ``pd``), or where there is no prefill instance; on a ``decode``
  instance when its uncached part is small: at most what it computes in one of its steps
  (measured prefill rate x measured step time, at least ``--short-prompt-tokens``: the stall
  its running decodes take is then one step), or when every prefill instance is saturated
  (its wait over ``--prefill-saturation-s``, ``pd``'s rule). Then it is chosen only where the
  formula says computing the small uncached part there is cheaper than a prefill elsewhere
  plus the transfer.

**Copies are priced twice.** A prefill instance that holds c' of the prompt while the best
holder among the candidates holds c computes c - c' tokens that already exist elsewhere,
and writes them into its own prefix cache: where prefixes exceed the cache, as they do
where prefix routing matters, that evicts about as many tokens of other prefixes, which a
later request computes again. So its predicted TTFT carries (c - c') / rate once more.
Without it, in the simulator (16 instances, 8P8D, 150 tenants of 6k-token prefixes, 800
requests) a holder with one cold prompt queued lost its prefix to an idle instance, the
copies evicted other tenants, and the prefill instances' hit rate fell to 70% at 2 req/s
and 58% at 4 (81% and 81% with the price; vllm-router's sticky tree: 82-83%).

**Sticky until saturated.** A holder p of c cached tokens keeps the prefix while

    queued(p) / rate(p)  <  queued(q) / rate(q) + 2c / rate(q)      (q: the best other instance)

that is, while its queue is shorter than the best other's by less than the time that one
would take to compute the cached part again, twice (once now, once for what the copy
evicts): the threshold is measured (the prefill rates of the reports), not a constant, and
scales with the prefix. A hot prefix whose holder's queue grows past it spreads to the next
instance, which from then on holds it too, so the load balances between the holders.
Approximate matches (instances without KV events) are taken at face value. Ties go to
``pd``'s choice.

A load report counts a waiting request's tokens less the prefix-cache hit it found as it
joined the queue (``LoadReport.waiting_prompt_tokens``), and the gateway's own pending work
only the uncached part (``Dispatch.cached_tokens``), so a holder's queue of mostly cached
requests is priced at what it will compute, not at its prompts' length. The operator's
view, with the events behind the index: docs/prefix-routing.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from pdserve.scheduler.admission import prefill_rate
from pdserve.scheduler.prefix_index import (
    DEFAULT_APPROXIMATE_MAX_BLOCKS,
    DEFAULT_APPROXIMATE_TTL_S,
    PrefixMatch,
)
from pdserve.scheduler.snapshot import ClusterSnapshot, InstanceView, Ranking, RequestEstimate


class CacheAwareSettings(BaseModel):
    """The ``cache-aware`` policy's own settings (flags ``--cache-*``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transfer_tokens_per_s: float = Field(
        50_000.0,
        gt=0,
        description="cache-aware: prompt tokens of KV one pull moves per second, the price "
        "of a transfer in the predicted TTFT",
    )
    # 0 by default: in the simulator (benchmark/results/sim-prefix-16) 0.5 dropped holders of
    # long prefixes almost always, so tenants spread and evicted each other (mean TTFT
    # 1.6-5.4x round-robin's, P99 ~1x); with 0 a holder keeps its prefix until it has no room
    # for the request's blocks (14-85x). The prefill side's stickiness bound still spreads
    # a hot prefix whose holder queues.
    decode_balance: float = Field(
        0.0,
        ge=0,
        le=1,
        description="cache-aware: a decode instance holding the prompt's prefix is preferred "
        "while its free KV blocks per request are at least this fraction of the best one's "
        "(0: while it has room for the request's blocks)",
    )
    approximate_ttl_s: float = Field(
        DEFAULT_APPROXIMATE_TTL_S,
        gt=0,
        description="cache-aware: for instances without KV events, a prompt routed there "
        "counts as cached this long",
    )
    approximate_max_blocks: int = Field(
        DEFAULT_APPROXIMATE_MAX_BLOCKS,
        ge=1,
        description="cache-aware: blocks remembered per instance without KV events (at most "
        "its KV cache)",
    )


@dataclass(frozen=True)
class CachePlacement:
    """``prefill`` None: ``decode`` computes the prompt itself; ``cached_tokens``: of the
    prompt, what the instance that computes it holds already."""

    decode: str
    prefill: str | None
    cached_tokens: int
    predicted_s: float


class CacheAwarePolicy:
    """The placement of the module docstring (pure; ``place`` returns None when no instance
    is usable at all)."""

    def __init__(
        self,
        settings: CacheAwareSettings,
        watermark: float,
        default_prefill_tokens_per_s: float,
        short_prompt_tokens: int,
        prefill_saturation_s: float,
    ) -> None:
        self.settings = settings
        self.watermark = watermark
        self.default_rate = default_prefill_tokens_per_s
        self.short_prompt_tokens = short_prompt_tokens
        self.prefill_saturation_s = prefill_saturation_s
        # The same rankings as ``pd``'s, so that without a cached prefix it chooses alike.
        self.decode_ranking = Ranking("decode", self._decode_key)
        self.prefill_ranking = Ranking("prefill", self._wait_key)
        self.any_ranking = Ranking("any", self._wait_key)

    # --- what the formula reads ---------------------------------------------------------------

    def _decode_key(self, view: InstanceView) -> tuple[float, int]:
        return -view.freeness(self.watermark), view.num_requests

    def _wait_key(self, view: InstanceView) -> tuple[float, int]:
        return self.wait_s(view, 0), view.num_requests

    def wait_s(self, view: InstanceView, tokens: int) -> float:
        """Seconds until the instance has computed its queue and then ``tokens`` more."""
        return (view.queued_prompt_tokens() + tokens) / prefill_rate(view, self.default_rate)

    def copy_s(self, view: InstanceView, tokens: int) -> float:
        """The price of computing ``tokens`` that another candidate holds: what the copy
        evicts, computed again later (module docstring, "copies are priced twice")."""
        return max(0, tokens) / prefill_rate(view, self.default_rate)

    def transfer_s(self, tokens: int) -> float:
        return max(0, tokens) / self.settings.transfer_tokens_per_s

    def colocate_limit(self, view: InstanceView) -> int:
        """The uncached tokens a ``decode`` instance computes for a request it decodes: what
        one of its steps computes (measured), at least ``short_prompt_tokens``."""
        load = view.load
        step_s = load.step_ms / 1e3 if load else 0.0
        one_step = int(prefill_rate(view, self.default_rate) * step_s)
        return max(self.short_prompt_tokens, one_step)

    def _eligible_decode(
        self, view: InstanceView, best: InstanceView, request: RequestEstimate
    ) -> bool:
        """A decode holder within the decode balance (module docstring)."""
        if view.virtual_free_blocks(self.watermark) < request.prompt_blocks(view.block_size):
            return False
        mine, theirs = view.freeness(self.watermark), best.freeness(self.watermark)
        if theirs <= 0:
            return mine >= theirs
        return mine >= self.settings.decode_balance * theirs

    # --- candidates ---------------------------------------------------------------------------

    @staticmethod
    def _holders(
        snapshot: ClusterSnapshot, prefix: PrefixMatch, first: InstanceView | None
    ) -> list[InstanceView]:
        """``first``, then the usable holders of the prefix by id (an order that does not
        depend on how the match was built)."""
        out = [first] if first is not None else []
        skip = first.instance_id if first is not None else None
        for instance_id in sorted(prefix):
            view = snapshot.get(instance_id)
            if instance_id != skip and prefix.tokens(instance_id) > 0 and view and view.usable:
                out.append(view)
        return out

    def _decoders(
        self,
        snapshot: ClusterSnapshot,
        best: InstanceView,
        request: RequestEstimate,
        prefix: PrefixMatch,
    ) -> list[InstanceView]:
        """The best decode instance, and the holders within the decode balance."""
        holders = self._holders(snapshot, prefix, best)[1:]
        eligible = [v for v in holders if v.can_decode and self._eligible_decode(v, best, request)]
        return [best, *eligible]

    def _prefillers(self, snapshot: ClusterSnapshot, prefix: PrefixMatch) -> list[InstanceView]:
        best = snapshot.best(self.prefill_ranking)
        if best is None:
            return []
        return [v for v in self._holders(snapshot, prefix, best) if v.role == "prefill"]

    # --- the choice ---------------------------------------------------------------------------

    def place(
        self, snapshot: ClusterSnapshot, request: RequestEstimate, prefix: PrefixMatch
    ) -> CachePlacement | None:
        best_decode = snapshot.best(self.decode_ranking)
        if best_decode is None:
            return self._whole_on_any(snapshot, request, prefix)
        prefillers = self._prefillers(snapshot, prefix)
        options: list[CachePlacement] = []
        for decode in self._decoders(snapshot, best_decode, request, prefix):
            options.extend(self._options(decode, prefillers, request, prefix))
        return _cheapest(options)

    def _options(
        self,
        decode: InstanceView,
        prefillers: list[InstanceView],
        request: RequestEstimate,
        prefix: PrefixMatch,
    ) -> Iterable[CachePlacement]:
        """The placements with ``decode`` decoding: disaggregated first (ties keep them)."""
        prompt = request.prompt_tokens
        held = min(prefix.tokens(decode.instance_id), prompt)
        alone = CachePlacement(decode.instance_id, None, held, self.wait_s(decode, prompt - held))
        if decode.role == "both" or not prefillers:
            yield alone
            return
        moved = self.transfer_s(prompt - held)
        waits = []
        cached_on = [min(prefix.tokens(p.instance_id), prompt) for p in prefillers]
        most = max(cached_on)
        for prefill, cached in zip(prefillers, cached_on, strict=True):
            wait = self.wait_s(prefill, prompt - cached) + self.copy_s(prefill, most - cached)
            waits.append(self.wait_s(prefill, 0))
            yield CachePlacement(decode.instance_id, prefill.instance_id, cached, wait + moved)
        saturated = min(waits) > self.prefill_saturation_s
        if prompt - held <= self.colocate_limit(decode) or saturated:
            yield alone

    def _whole_on_any(
        self, snapshot: ClusterSnapshot, request: RequestEstimate, prefix: PrefixMatch
    ) -> CachePlacement | None:
        """No decode-capable instance: the whole request where it is computed soonest."""
        prompt = request.prompt_tokens
        options = []
        for view in self._holders(snapshot, prefix, snapshot.best(self.any_ranking)):
            held = min(prefix.tokens(view.instance_id), prompt)
            options.append(
                CachePlacement(view.instance_id, None, held, self.wait_s(view, prompt - held))
            )
        return _cheapest(options)


def _cheapest(options: list[CachePlacement]) -> CachePlacement | None:
    """The least predicted TTFT, the first on a tie."""
    best = None
    for option in options:
        if best is None or option.predicted_s < best.predicted_s:
            best = option
    return best
