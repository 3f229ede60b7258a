"""vllm-router's ``cache_aware`` policy re-created over pdserve's snapshot: a baseline.

The real comparison (``pdserve bench compare --setups vllm-router-cache-aware``) runs the Rust
router itself; this module lets the simulator run the same rule at scales this machine cannot
(issue 14: 16 instances and more), and ``pdserve serve --policy router-cache-aware`` run it
behind pdserve's gateway. The rule (vllm-router 0.1.x, after SGLang's router; defaults
theirs):

1. **Imbalance first.** With ``load`` the requests the router has in flight on each worker
   (here ``InstanceView.num_requests``: running + waiting as reported, plus the gateway's own
   just-sent ones), the cluster is imbalanced when ``max - min > balance_abs_threshold`` *and*
   ``max > balance_rel_threshold x min``; then the least loaded worker gets the request,
   whatever it holds.
2. **Else the longest match.** Each worker has an approximate tree of the prompts *routed* to
   it (no KV events: what vLLM evicted is still believed cached). The worker with the longest
   match gets the request when the match covers more than ``cache_threshold`` of the prompt;
   else the worker with the *smallest* tree (the most room, as the router guesses it).
3. The prompt is then inserted in the chosen worker's tree.

What differs from the Rust router, and why it does not favour pdserve:

- the tree is ``pdserve.scheduler.prefix_index``'s approximate tracking (``Tracking``
  ``APPROXIMATE``: routed prompts by block of token ids, least recently routed dropped past
  ``max_tree_tokens``), so matches are in whole blocks of tokens, not characters; the router
  matches text, which for the same prompts gives the same choices up to one block;
- the router's trees are trimmed to ``max_tree_size`` characters by a thread every
  ``eviction_interval`` seconds; here the least recent entries go at once past the limit, and
  nothing ages out by time (``PREFIX_TRACKING``: no TTL), as in the router;
- the tree size of rule 2 is the tokens this policy has inserted there that were new to the
  worker's tree (``_tree_tokens``), the router's count of characters in the worker's tree,
  without its eviction (which at the default size does not happen in these runs).

In a cluster with prefill and decode instances each choice uses the rule over its own pool,
as vllm-router's PD mode does; a ``both`` instance chosen to decode serves the whole request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from pdserve.scheduler.prefix_index import PrefixMatch, PrefixTracking
from pdserve.scheduler.snapshot import ClusterSnapshot, InstanceView, RequestEstimate


class RouterCacheAwareSettings(BaseModel):
    """The ``router-cache-aware`` policy's settings (flags ``--router-*``): vllm-router's own
    options of the same names and defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache_threshold: float = Field(
        0.3,
        ge=0,
        le=1,
        description="router-cache-aware: the longest match wins when it covers more than "
        "this fraction of the prompt (vllm-router's --cache-threshold)",
    )
    balance_abs_threshold: int = Field(
        64,
        ge=0,
        description="router-cache-aware: the least loaded instance wins when the most loaded "
        "has more than this many requests more (and the relative threshold holds too)",
    )
    balance_rel_threshold: float = Field(
        1.5,
        ge=1,
        description="router-cache-aware: the least loaded instance wins when the most loaded "
        "has more than this many times its requests (and the absolute threshold holds too)",
    )
    max_tree_tokens: int = Field(
        1 << 23,
        ge=1,
        description="router-cache-aware: prompt tokens remembered per instance (vllm-router's "
        "--max-tree-size is 2^25 characters, about 2^23 tokens)",
    )


class RouterCacheAwarePolicy:
    """The rule of the module docstring. Pure over the snapshot and the match, but for its own
    record of tree sizes (as ``RoundRobinPolicy`` keeps its turns)."""

    def __init__(self, settings: RouterCacheAwareSettings, block_size: int = 16) -> None:
        self.settings = settings
        self.tracking = PrefixTracking(
            kv_events=False,
            approximate_ttl_s=math.inf,
            approximate_max_blocks=max(1, settings.max_tree_tokens // block_size),
            bounded_by_capacity=False,
        )
        self._tree_tokens: dict[str, int] = {}

    def imbalanced(self, pool: Sequence[InstanceView]) -> bool:
        loads = [view.num_requests for view in pool]
        most, least = max(loads), min(loads)
        return (
            most - least > self.settings.balance_abs_threshold
            and most > self.settings.balance_rel_threshold * least
        )

    def pick(
        self, pool: Sequence[InstanceView], request: RequestEstimate, prefix: PrefixMatch
    ) -> InstanceView:
        """One worker of ``pool`` (not empty) by rules 1 and 2; ties to the first by id."""
        ordered = sorted(pool, key=lambda view: view.instance_id)
        if self.imbalanced(ordered):
            return min(ordered, key=lambda view: view.num_requests)
        longest = max(ordered, key=lambda view: prefix.tokens(view.instance_id))
        matched = prefix.tokens(longest.instance_id)
        if matched > self.settings.cache_threshold * max(1, request.prompt_tokens):
            return longest
        return min(ordered, key=lambda view: self._tree_tokens.get(view.instance_id, 0))

    def insert(self, view: InstanceView, request: RequestEstimate, prefix: PrefixMatch) -> None:
        """Rule 3's bookkeeping: the chosen worker's tree grew by the unmatched tokens."""
        grown = max(0, request.prompt_tokens - prefix.tokens(view.instance_id))
        self._tree_tokens[view.instance_id] = self._tree_tokens.get(view.instance_id, 0) + grown

    def place(
        self, snapshot: ClusterSnapshot, request: RequestEstimate, prefix: PrefixMatch
    ) -> tuple[str, str | None] | None:
        """(decode, prefill or None) or None when no instance is usable at all."""
        decoders = snapshot.pool("decode")
        if not decoders:
            anyone = snapshot.pool("any")
            if not anyone:
                return None
            whole = self.pick(anyone, request, prefix)
            self.insert(whole, request, prefix)
            return whole.instance_id, None
        decode = self.pick(decoders, request, prefix)
        prefillers = snapshot.pool("prefill")
        if decode.role == "both" or not prefillers:
            self.insert(decode, request, prefix)
            return decode.instance_id, None
        prefill = self.pick(prefillers, request, prefix)
        self.insert(prefill, request, prefix)
        self.insert(decode, request, prefix)
        return decode.instance_id, prefill.instance_id
