"""The control plane's prefix index: fed by the instances' prefix events, read at dispatch.

Each instance's relay (``pdserve.instance.prefix_relay``) sends ``PrefixEvents`` batches to
the control plane's socket, in the same authenticated envelope as load reports; the control
plane hands them here (``receive``). A batch is applied in order when its number follows
the last one of the same start of the instance (``incarnation``). Otherwise:

- another incarnation: the instance restarted with an empty cache, what was known of it
  is dropped;
- a ``full`` batch: a complete picture follows (the relay sends one when it connects, so a
  restarted gateway is whole again, and after it had to drop a batch): the instance's
  entries are dropped first;
- a number skipped (a lost batch, or a gateway that started while the instance ran): the
  instance's entries are dropped and rebuilt from the batches that follow; blocks cached
  before the gap are unknown until the relay's next full picture (counted in ``gaps``).

An instance that sends no events (``pdserve instance --no-prefix-events``, or another
server) is tracked approximately: ``routed`` records the prompts placed there
(``PrefixIndex.routed``), aged out.

Only a policy that reads the index (``PrefixAwarePolicy``: ``cache-aware``,
``router-cache-aware``) makes this do any work: with another policy batches are dropped on
arrival and nothing is matched. The policy says how the index is kept (its ``tracking``,
``PrefixTracking``): ``router-cache-aware`` drops the events and tracks every instance
approximately, without a TTL, as vllm-router does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pdserve.logs import get_logger
from pdserve.protocol.prefix import Cleared, PrefixEvents, Removed, Stored, prompt_keys
from pdserve.protocol.reports import LoadReport, Register
from pdserve.scheduler.dispatch import Dispatch, DispatchPolicy, PrefixAwarePolicy
from pdserve.scheduler.prefix_index import NO_MATCH, PrefixIndex, PrefixMatch, PrefixTracking
from pdserve.scheduler.snapshot import ClusterSnapshot, RequestEstimate

logger = get_logger(__name__)

_DEFAULT_BLOCK_SIZE = 16


@dataclass
class _Stream:
    """Where one instance's batches stand: its start and the last number applied."""

    incarnation: str
    seq: int


class PrefixRouting:
    """The index and its bookkeeping (module docstring)."""

    def __init__(self, policy: DispatchPolicy) -> None:
        self.enabled = isinstance(policy, PrefixAwarePolicy)
        self.tracking: PrefixTracking | None = (
            policy.tracking if isinstance(policy, PrefixAwarePolicy) else None
        )
        self.index = (
            PrefixIndex(
                approximate_max_blocks=self.tracking.approximate_max_blocks,
                approximate_ttl_s=self.tracking.approximate_ttl_s,
            )
            if self.tracking is not None
            else PrefixIndex()
        )
        self._streams: dict[str, _Stream] = {}
        self.batches = 0
        self.gaps = 0
        # The keys of the last prompt matched (dispatch, then ``routed`` on the same one).
        self._last: tuple[tuple[int, ...] | None, int, list[int]] = (None, 0, [])

    # --- events -------------------------------------------------------------------------------

    @property
    def wants_events(self) -> bool:
        """Whether the instances' events are applied (the simulator sends them only then)."""
        return self.tracking is not None and self.tracking.kv_events

    def receive(self, message: PrefixEvents) -> None:
        if not self.wants_events:
            return
        self.batches += 1
        instance_id = message.instance_id
        stream = self._streams.get(instance_id)
        if stream is not None and stream.incarnation != message.incarnation:
            self.index.forget(instance_id)
            stream = None
        if stream is not None and message.seq <= stream.seq and not message.full:
            return  # late or repeated
        if message.full:
            self.index.cleared(instance_id)
        elif message.seq != (stream.seq if stream is not None else 0) + 1:
            self._gap(instance_id, stream, message.seq)
        self._streams[instance_id] = _Stream(message.incarnation, message.seq)
        self._apply(instance_id, message)

    def _gap(self, instance_id: str, stream: _Stream | None, seq: int) -> None:
        self.gaps += 1
        self.index.cleared(instance_id)
        logger.info(
            "pdserve: prefix events of %s resume at %d after %s; its index is rebuilt",
            instance_id,
            seq,
            stream.seq if stream is not None else "none seen",
        )

    def _apply(self, instance_id: str, message: PrefixEvents) -> None:
        index = self.index
        for event in message.events:
            if isinstance(event, Stored):
                index.stored_keys(instance_id, event.hashes, event.keys, message.block_size)
            elif isinstance(event, Removed):
                index.removed(instance_id, event.hashes)
            elif isinstance(event, Cleared):
                index.cleared(instance_id)

    def joined(self, info: Register) -> None:
        """An instance (re)registered as a new process: what was known of an older one goes
        (its own events may have come first: those of this incarnation stay)."""
        stream = self._streams.get(info.instance_id)
        if stream is None or stream.incarnation != info.incarnation:
            self.forget(info.instance_id)

    def forget(self, instance_id: str) -> None:
        self._streams.pop(instance_id, None)
        self.index.forget(instance_id)

    # --- dispatch -----------------------------------------------------------------------------

    def _keys(self, tokens: tuple[int, ...], block_size: int) -> list[int]:
        last_tokens, last_size, keys = self._last
        if last_tokens is not tokens or last_size != block_size:
            keys = prompt_keys(tokens, block_size)
            self._last = (tokens, block_size, keys)
        return keys

    def match(self, estimate: RequestEstimate, now: float) -> PrefixMatch:
        """Where the request's prompt is cached (every block size the index holds)."""
        tokens = estimate.prompt_token_ids
        if not self.enabled or tokens is None or not len(self.index):
            return NO_MATCH
        best = NO_MATCH
        for block_size in sorted(self.index.block_sizes()):
            found = self.index.match_keys(self._keys(tokens, block_size), block_size, now)
            if not best:
                best = found
            elif found:
                merged = {**best.cached, **found.cached}
                best = PrefixMatch(merged, best.approximate | found.approximate, block_size)
        return best

    def choose(
        self,
        policy: DispatchPolicy,
        snapshot: ClusterSnapshot,
        estimate: RequestEstimate,
        now: float,
    ) -> Dispatch:
        """The policy's choice, with the request's match for a policy that reads it."""
        if self.enabled and isinstance(policy, PrefixAwarePolicy):
            return policy.choose_cached(snapshot, estimate, self.match(estimate, now))
        return policy.choose(snapshot, estimate)

    def routed(
        self, estimate: RequestEstimate, now: float, placed: Mapping[str, LoadReport | None]
    ) -> None:
        """The prompt was placed on these instances (their last reports): each will hold it,
        which is recorded for those without events (``PrefixIndex.routed``)."""
        tokens = estimate.prompt_token_ids
        if not self.enabled or tokens is None:
            return
        for instance_id, load in placed.items():
            block_size = load.block_size if load else _DEFAULT_BLOCK_SIZE
            bounded = self.tracking is not None and self.tracking.bounded_by_capacity
            capacity = load.total_blocks if load and bounded else None
            keys = self._keys(tokens, block_size)
            self.index.routed(instance_id, keys, block_size, now, capacity)
