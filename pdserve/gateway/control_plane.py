"""The global scheduler's live side: instance registry, health, and dispatch bookkeeping.

Instances push ``Register`` / ``LoadReport`` / ``Deregister`` messages to one PULL socket.
An instance is healthy while its load reports keep coming (every 100 ms by default) and the
gateway has not just seen it break; it is usable once it has reported at least once. The
policies in ``pdserve.scheduler`` never see any of this machinery, only ``snapshot()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from pdserve.gateway.prefix_events import PrefixRouting
from pdserve.gateway.settings import GatewaySettings
from pdserve.logs import get_logger
from pdserve.protocol.reports import (
    ControlMessage,
    Deregister,
    HoldingsReport,
    KVHoldings,
    LoadReport,
    PrefixEvents,
    Register,
)
from pdserve.protocol.wire import AuthError, Codec
from pdserve.scheduler.dispatch import Dispatch, DispatchPolicy, NoCapacity, NoInstance
from pdserve.scheduler.index import ClusterIndex
from pdserve.scheduler.snapshot import (
    ClusterSnapshot,
    InstanceView,
    Pending,
    RequestEstimate,
)

logger = get_logger(__name__)

# A dispatch stops counting as pending once a report received this much later exists.
PENDING_GRACE_S = 0.15
PENDING_MAX_AGE_S = 2.0
# A held entry (a decode leg waiting for its prefill) lasts until the leg starts or the
# request ends; this only bounds what a lost release could leave behind.
HELD_MAX_AGE_S = 600.0


# Fields of a record its ``InstanceView`` is made of: setting one makes the view again.
_VIEW_FIELDS = frozenset({"info", "load", "draining", "healthy", "pending", "held"})
_MISSING = object()
_NO_PENDING = Pending()


@dataclass
class InstanceRecord:
    """What the control plane knows of one instance.

    Its ``InstanceView`` is kept until the record changes: setting a field the view shows,
    ``changed()`` after changing ``pending`` or ``held`` in place, or a pending or held
    entry ageing out (``view(now)`` checks its oldest entries' ages).
    """

    info: Register
    registered_at: float
    load: LoadReport | None = None
    last_report_at: float | None = None
    draining: bool = False
    suspect_until: float = 0.0
    healthy: bool = False
    given_up: bool = False
    pending: list[tuple[float, Pending]] = field(default_factory=list)
    # Decode legs of requests still in their prefill phase, by request key. A load report
    # cannot show them (the request reaches this instance only after the prefill), so they
    # stay until the leg starts (``ControlPlane.decode_started``) or the request ends.
    held: dict[str, tuple[float, Pending]] = field(default_factory=dict)
    # What each KV worker (tensor-parallel rank) last said it holds (``HoldingsReport``).
    kv_holdings: dict[int, KVHoldings] = field(default_factory=dict)
    # The view as last made, and the times of the oldest pending and held entries in it.
    _view: InstanceView | None = field(default=None, init=False, repr=False, compare=False)
    _pending_since: float = field(default=math.inf, init=False, repr=False, compare=False)
    _held_since: float = field(default=math.inf, init=False, repr=False, compare=False)
    # The control plane's: told when the view is dropped, and when it is made again.
    _on_change: Callable[[InstanceRecord], None] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    _on_view: Callable[[InstanceRecord, InstanceView], None] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _VIEW_FIELDS and self.__dict__.get(name, _MISSING) is not value:
            object.__setattr__(self, name, value)
            self.changed()
        else:
            object.__setattr__(self, name, value)

    def changed(self) -> None:
        """The view is made again when next asked for (``pending`` or ``held`` changed)."""
        self.__dict__["_view"] = None
        listener = self.__dict__.get("_on_change")
        if listener is not None:
            listener(self)

    def holdings(self) -> KVHoldings:
        """The instance's KV holdings over its ranks (0s until a worker has reported)."""
        total = KVHoldings()
        for holdings in self.kv_holdings.values():
            total = total.combine(holdings)
        return total

    def pending_total(self, now: float) -> Pending:
        """What was sent here that the reports may not show yet; drops entries too old by
        ``now`` (and notes the oldest left, by which the view is to be made again)."""
        d = self.__dict__
        if not self.pending and not self.held:
            d["_pending_since"] = d["_held_since"] = math.inf
            return _NO_PENDING
        requests = tokens = blocks = 0
        pending_since = held_since = math.inf
        stale = False
        for t, p in self.pending:
            if now - t < PENDING_MAX_AGE_S:
                requests += p.requests
                tokens += p.prompt_tokens
                blocks += p.blocks
                if t < pending_since:  # noqa: PLR1730 (cheaper than a call)
                    pending_since = t
            else:
                stale = True
        if stale:
            d["pending"] = [(t, p) for t, p in self.pending if now - t < PENDING_MAX_AGE_S]
        held_stale = False
        for t, p in self.held.values():
            if now - t < HELD_MAX_AGE_S:
                requests += p.requests
                tokens += p.prompt_tokens
                blocks += p.blocks
                if t < held_since:  # noqa: PLR1730
                    held_since = t
            else:
                held_stale = True
        if held_stale:
            d["held"] = {k: (t, p) for k, (t, p) in self.held.items() if now - t < HELD_MAX_AGE_S}
        d["_pending_since"] = pending_since
        d["_held_since"] = held_since
        if stale or held_stale:
            self.changed()
        return Pending(requests, tokens, blocks)

    def view(self, now: float) -> InstanceView:
        view = self._view
        if (
            view is not None
            and now - self._pending_since < PENDING_MAX_AGE_S
            and now - self._held_since < HELD_MAX_AGE_S
        ):
            return view
        info = self.info
        view = InstanceView.of(
            info.instance_id,
            info.role,
            self.healthy,
            not self.draining,
            self.load,
            self.pending_total(now),
            info.max_model_len,
        )
        self.__dict__["_view"] = view
        listener = self._on_view
        if listener is not None:
            listener(self, view)
        return view


class _Oldest:
    """The oldest entry time of one kind (pending, held) per record, in a heap: which
    records have an entry older than ``max_age`` by a given time."""

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self._heap: list[tuple[float, str]] = []
        self._since: dict[str, float] = {}

    def set(self, instance_id: str, since: float) -> None:
        if since == math.inf:
            self._since.pop(instance_id, None)
            return
        if self._since.get(instance_id) == since:
            return
        self._since[instance_id] = since
        heapq.heappush(self._heap, (since, instance_id))
        if len(self._heap) > 2 * len(self._since) + 64:  # mostly stale: rebuilt
            self._heap = [(t, i) for i, t in self._since.items()]
            heapq.heapify(self._heap)

    def expired(self, now: float) -> list[str]:
        heap, since, found = self._heap, self._since, []
        while heap and now - heap[0][0] >= self.max_age:
            t, instance_id = heapq.heappop(heap)
            if since.get(instance_id) == t:
                del since[instance_id]
                found.append(instance_id)
        return found


InstanceListener = Callable[[str], Any]


class ControlPlane:
    def __init__(
        self,
        settings: GatewaySettings,
        secret: bytes,
        policy: DispatchPolicy,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: the time every entry point uses when given none (the simulator passes
        its simulated clock; nothing here opens a socket before ``start``)."""
        self.settings = settings
        self.policy = policy
        # Where prompts' prefixes are cached: fed by instances' PrefixEvents, read at dispatch.
        self.prefix = PrefixRouting(policy)
        self.clock = clock
        self.instances: dict[str, InstanceRecord] = {}
        self._codec: Codec[Any] = Codec(ControlMessage, secret)
        self._ctx = zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._down_listeners: list[InstanceListener] = []
        self.refused_messages = 0
        # Requests waiting in ``dispatch_with_room`` now (for decode room or silent instances).
        self.held_requests = 0
        # Set (and dropped) at every load report: requests held for decode room wait on it.
        self._reported: asyncio.Event | None = None
        # The views as the policies get them, kept up to date record by record.
        self._index = ClusterIndex()
        self._dirty: dict[str, InstanceRecord] = {}  # records whose view is to be made again
        self._pending_oldest = _Oldest(PENDING_MAX_AGE_S)
        self._held_oldest = _Oldest(HELD_MAX_AGE_S)
        self._held_at: dict[str, set[str]] = {}  # request key -> instances holding it
        self._reports = 0

    @property
    def address(self) -> str:
        return f"tcp://{self.settings.control_host}:{self.settings.control_port}"

    async def start(self) -> None:
        self._socket = self._ctx.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(self.address)
        self._tasks = [
            asyncio.create_task(self._receive(), name="pdserve-control-receive"),
            asyncio.create_task(self._watch(), name="pdserve-control-watch"),
        ]
        logger.info("pdserve: control plane listening on %s", self.address)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._socket is not None:
            self._socket.close(linger=0)

    def on_instance_down(self, listener: InstanceListener) -> None:
        """Called with an instance id when it stops being healthy (died, stalled, left)."""
        self._down_listeners.append(listener)

    # --- messages --------------------------------------------------------------------------

    async def _receive(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart()
            try:
                message = self._codec.decode(frames)
            except AuthError as e:
                self.refused_messages += 1
                if self.refused_messages <= 10 or self.refused_messages % 1000 == 0:
                    logger.warning(
                        "pdserve: refused a control message (%d so far): %s",
                        self.refused_messages,
                        e,
                    )
                continue
            self.handle(message)

    def handle(self, message: Any, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if isinstance(message, LoadReport):  # the most frequent first
            self._report(message, now)
        elif isinstance(message, Register):
            self._register(message, now)
        elif isinstance(message, PrefixEvents):
            self.prefix.receive(message)
        elif isinstance(message, HoldingsReport):
            record = self.instances.get(message.instance_id)
            if record is not None and message.incarnation == record.info.incarnation:
                record.kv_holdings[message.rank] = message.holdings
        elif isinstance(message, Deregister):
            record = self._forget(message.instance_id)
            if record is not None:
                logger.info("pdserve: instance %s left", message.instance_id)
                self._notify_down(message.instance_id)

    # --- the views ---------------------------------------------------------------------------

    def _adopt(self, record: InstanceRecord, now: float) -> None:
        """``record`` is now the instance's (new, or in place of an older one)."""
        instance_id = record.info.instance_id
        old = self.instances.get(instance_id)
        if old is not None and old is not record:
            old._on_change = old._on_view = None
        self.instances[instance_id] = record
        record._on_change = self._record_changed
        record._on_view = self._record_viewed
        record.changed()
        record.view(now)  # in the index at once: it keeps the registration order

    def _forget(self, instance_id: str) -> InstanceRecord | None:
        record = self.instances.pop(instance_id, None)
        if record is not None:
            record._on_change = record._on_view = None
            self._dirty.pop(instance_id, None)
            self._index.remove(instance_id)
            self.prefix.forget(instance_id)
            self._pending_oldest.set(instance_id, math.inf)
            self._held_oldest.set(instance_id, math.inf)
        return record

    def _record_changed(self, record: InstanceRecord) -> None:
        instance_id = record.info.instance_id
        if self.instances.get(instance_id) is record:
            self._dirty[instance_id] = record

    def _record_viewed(self, record: InstanceRecord, view: InstanceView) -> None:
        instance_id = view.instance_id
        if self.instances.get(instance_id) is not record:
            return
        self._dirty.pop(instance_id, None)
        self._index.set(instance_id, view)
        self._pending_oldest.set(instance_id, record._pending_since)
        self._held_oldest.set(instance_id, record._held_since)

    def _make_view(self, record: InstanceRecord, now: float) -> None:
        """``record.view(now)`` after a report (its view dropped), without the detours."""
        fields = record.__dict__
        if record.pending or record.held:
            pending = record.pending_total(now)
        else:
            fields["_pending_since"] = fields["_held_since"] = math.inf
            pending = _NO_PENDING
        info = record.info
        instance_id = info.instance_id
        view = InstanceView.of(
            instance_id,
            info.role,
            fields["healthy"],
            not fields["draining"],
            fields["load"],
            pending,
            info.max_model_len,
        )
        fields["_view"] = view
        if self.instances.get(instance_id) is not record:
            return  # forgotten meanwhile (a listener of its health): as ``_record_viewed``
        self._dirty.pop(instance_id, None)
        self._index.set(instance_id, view)
        self._pending_oldest.set(instance_id, fields["_pending_since"])
        self._held_oldest.set(instance_id, fields["_held_since"])

    def _register(self, info: Register, now: float) -> None:
        record = self.instances.get(info.instance_id)
        if record is None or (record.info.pid, record.info.url, record.info.incarnation) != (
            info.pid,
            info.url,
            info.incarnation,
        ):
            if record is not None:
                self._notify_down(info.instance_id)  # a restarted instance lost its requests
            logger.info(
                "pdserve: instance %s (%s) joined at %s", info.instance_id, info.role, info.url
            )
            draining = record.draining if record is not None else False
            self.prefix.joined(info)
            self._adopt(InstanceRecord(info, now, draining=draining), now)
        else:
            record.info = info

    def _report(self, report: LoadReport, now: float) -> None:
        record = self.instances.get(report.instance_id)
        if record is None:
            return  # it registers again within seconds
        if report.incarnation != record.info.incarnation:
            # A new process under the same name: its engine reports before its HTTP server
            # answers (and registers). The old process is gone, so are its requests; the new
            # one gets work once it registers.
            if record.healthy or not record.given_up:
                logger.warning(
                    "pdserve: instance %s restarted; out of rotation until it registers",
                    report.instance_id,
                )
                record.healthy = False
                record.given_up = True
                record.suspect_until = math.inf  # until the new process's record replaces it
                self._notify_down(report.instance_id)
            return
        if record.load is not None and report.seq <= record.load.seq and report.seq > 1:
            return  # late or duplicate
        # Set in the record's dict (one notice of the change, not one per field): this runs
        # for every report of every instance.
        fields = record.__dict__
        fields["load"] = report
        fields["last_report_at"] = now
        if record.pending:
            fields["pending"] = [(t, p) for t, p in record.pending if now - t < PENDING_GRACE_S]
        fields["_view"] = None
        if not (fields["healthy"] and now >= fields["suspect_until"]):
            # A healthy instance reporting now stays healthy (its silence is 0): only the
            # others have their health to update.
            self._dirty[report.instance_id] = record
            self._update_health(record, now)
        self._make_view(record, now)  # made here, off the decisions' path
        self._reports += 1
        if not self._reports % 64:
            self._index.tidy()
        reported = self._reported
        if reported is not None:
            self._reported = None
            reported.set()

    # --- health ----------------------------------------------------------------------------

    def _update_health(self, record: InstanceRecord, now: float) -> None:
        """Healthy: receives new work. Given up: its in-flight requests move elsewhere.

        A short silence (an overloaded host can starve a reporter for a second) only stops
        new work; giving up on in-flight requests needs a longer silence, or proof of death
        (a broken connection, a restart, a deregistration).
        """
        silence = now - (record.last_report_at or record.registered_at)
        fresh = record.last_report_at is not None and silence <= self.settings.heartbeat_timeout_s
        healthy = fresh and now >= record.suspect_until
        if record.healthy and not healthy:
            logger.warning(
                "pdserve: instance %s is out of rotation (no load report for %.1f s)",
                record.info.instance_id,
                silence,
            )
        elif healthy and not record.healthy:
            logger.info("pdserve: instance %s is healthy", record.info.instance_id)
            record.given_up = False
        if record.healthy is not healthy:
            record.healthy = healthy
        if (
            not healthy
            and not record.given_up
            and record.last_report_at is not None
            and silence > self.settings.dead_after_s
        ):
            logger.warning(
                "pdserve: giving up on instance %s after %.1f s of silence",
                record.info.instance_id,
                silence,
            )
            record.given_up = True
            self._notify_down(record.info.instance_id)

    def _notify_down(self, instance_id: str) -> None:
        for listener in self._down_listeners:
            try:
                listener(instance_id)
            except Exception:
                logger.exception("pdserve: instance-down listener failed")

    async def _watch(self) -> None:
        interval = min(0.1, self.settings.heartbeat_timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            self.check_health()

    def check_health(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        for instance_id, record in list(self.instances.items()):
            self._update_health(record, now)
            last = record.last_report_at or record.registered_at
            if not record.healthy and now - last > self.settings.forget_after_s:
                logger.info("pdserve: forgetting instance %s", instance_id)
                self._forget(instance_id)

    def mark_broken(self, instance_id: str) -> None:
        """The gateway saw a connection to the instance break: no new work for a while.

        Requests whose own connection broke fail over by themselves; the others stay until
        the instance is given up (silence) or comes back.
        """
        record = self.instances.get(instance_id)
        if record is not None:
            record.suspect_until = self.clock() + self.settings.heartbeat_timeout_s
            self._update_health(record, self.clock())

    # --- what the rest of the gateway uses --------------------------------------------------

    def snapshot(self) -> ClusterSnapshot:
        """Every instance's view now (immutable), with the index that answers the policies'
        questions without a scan. Only the views of records that changed, or whose pending
        or held entries aged out by now, are made again."""
        now = self.clock()
        for oldest in (self._pending_oldest, self._held_oldest):
            for instance_id in oldest.expired(now):
                record = self.instances.get(instance_id)
                if record is not None:
                    record.changed()
        if self._dirty:
            for record in list(self._dirty.values()):
                record.view(now)
        return self._index.snapshot()

    def dispatch(self, estimate: RequestEstimate, key: str | None = None) -> Dispatch:
        """Asks the policy, then counts the request as pending where it goes (``place``).

        Raises the policy's ``NoInstance`` (no usable instance at all) and ``NoCapacity`` (every
        decode instance full: see ``dispatch_with_room``).
        """
        choice = self.prefix.choose(self.policy, self.snapshot(), estimate, self.clock())
        self.place(choice, estimate, key)
        return choice

    async def dispatch_with_room(
        self, estimate: RequestEstimate, key: str | None, wait_s: float
    ) -> tuple[Dispatch, float]:
        """``dispatch``, holding the request while every decode instance is full.

        Back-pressure: a disaggregated request is not prefilled until a decode instance has
        room for its KV (else its export waits on the prefill instance until the lease ends).
        Each load report is a chance; after ``wait_s`` the request is placed whole on the
        decode instance the policy preferred, where it queues holding nothing elsewhere.
        Likewise, while every instance is only briefly silent (out of rotation, not given up:
        a missing role alone never raises ``NoInstance``), the request waits for their
        reports instead of failing at once.
        Returns the choice and the seconds held.
        """
        started = self.clock()
        held = False
        try:
            while True:
                try:
                    choice = self.dispatch(estimate, key)
                except NoInstance:
                    # Every instance is out of rotation for a short silence (a starved host),
                    # none given up: waiting for the next report beats a 503.
                    if wait_s - (self.clock() - started) <= 0 or not self._briefly_silent():
                        raise
                    held = self._hold(held)
                    await self._next_report(wait_s - (self.clock() - started))
                    continue
                except NoCapacity as full:
                    left = wait_s - (self.clock() - started)
                    if left <= 0 or full.decode not in self.instances:
                        choice = Dispatch(decode=full.decode)
                        self.place(choice, estimate, key)
                    else:
                        held = self._hold(held)
                        await self._next_report(left)
                        continue
                return choice, (self.clock() - started if held else 0.0)
        finally:
            if held:
                self.held_requests -= 1

    def _hold(self, held: bool) -> bool:
        """Counts a request as held (``held_requests``, a gauge of the metrics) once."""
        if not held:
            self.held_requests += 1
        return True

    async def _next_report(self, timeout_s: float) -> None:
        """Returns at the next load report of any instance, or after ``timeout_s``."""
        if self._reported is None:
            self._reported = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reported.wait(), timeout=timeout_s)

    def _briefly_silent(self) -> bool:
        """Some instance that reported before is out of rotation but not given up."""
        return any(
            not r.healthy and not r.given_up and r.load is not None and not r.draining
            for r in self.instances.values()
        )

    def place(self, choice: Dispatch, estimate: RequestEstimate, key: str | None = None) -> None:
        """Counts a placed request as pending on its instances.

        With a request ``key``, a disaggregated request's decode share is *held* until
        ``decode_started`` / ``forget_held``: the decode instance sees the request only after
        the prefill, so its load reports cannot stand in for it (else a burst of long prompts
        all picks the same decode instance).
        """
        now = self.clock()
        decode = self.instances[choice.decode]
        blocks = estimate.prompt_blocks(decode.load.block_size if decode.load else 16)
        # Only the part of the prompt not in the prefilling instance's cache is work there.
        tokens = max(0, estimate.prompt_tokens - choice.cached_tokens)
        placed = {choice.decode: decode.load}
        if choice.prefill is not None:
            prefill = self.instances[choice.prefill]
            placed[choice.prefill] = prefill.load
            prefill.pending.append((now, Pending(1, tokens, blocks)))
            prefill.changed()
            if key is not None:
                decode.held[key] = (now, Pending(1, 0, blocks))
                self._held_at.setdefault(key, set()).add(choice.decode)
            else:
                decode.pending.append((now, Pending(1, 0, blocks)))
        else:
            decode.pending.append((now, Pending(1, tokens, blocks)))
        decode.changed()
        self.prefix.routed(estimate, now, placed)

    def dispatch_decode(self, estimate: RequestEstimate, prefilled: bool) -> str:
        """A decode-capable instance for a request whose decode instance went away.

        Only decode-capable instances are offered to the policy, so it places no prefill;
        while none is usable, every instance is (the policy's fallback then serves the
        request whole on one, the prefill instance itself included: roles are preferences).
        ``prefilled``: the KV exists elsewhere, so no prompt tokens are queued there.
        """
        snapshot = self.snapshot()
        if snapshot.pool("decode"):
            snapshot = ClusterSnapshot(tuple(v for v in snapshot.instances if v.can_decode))
        choice = self.policy.choose(snapshot, estimate)
        record = self.instances[choice.decode]
        blocks = estimate.prompt_blocks(record.load.block_size if record.load else 16)
        tokens = 0 if prefilled else estimate.prompt_tokens
        record.pending.append((self.clock(), Pending(1, tokens, blocks)))
        record.changed()
        return choice.decode

    def decode_started(self, key: str, instance_id: str) -> None:
        """The held decode share of ``key`` becomes ordinary pending work on the instance
        (its next reports show the request), and is dropped anywhere else."""
        now = self.clock()
        for record_id in sorted(self._held_at.pop(key, ())):
            record = self.instances.get(record_id)
            entry = record.held.pop(key, None) if record is not None else None
            if record is None or entry is None:
                continue
            if record_id == instance_id:
                record.pending.append((now, entry[1]))
            record.changed()
            record.view(now)  # here, not in the next decision

    def forget_held(self, key: str) -> None:
        """The request ended before its decode leg started: nothing is coming."""
        for record_id in self._held_at.pop(key, ()):
            record = self.instances.get(record_id)
            if record is not None and record.held.pop(key, None) is not None:
                record.changed()
                record.view(self.clock())

    def record(self, instance_id: str) -> InstanceRecord | None:
        return self.instances.get(instance_id)

    def url(self, instance_id: str) -> str:
        record = self.instances.get(instance_id)
        if record is None:
            raise KeyError(instance_id)
        return record.info.url

    def models(self) -> dict[str, int]:
        """Model names of every registered instance and their context length: a request for
        one whose instances are only briefly silent waits for them (``dispatch_with_room``)."""
        return {r.info.model: r.info.max_model_len for r in self.instances.values()}

    def usable_models(self) -> dict[str, int]:
        """The models some usable instance (of any role) serves now: ``/v1/models``."""
        served: dict[str, int] = {}
        for view in self.snapshot().pool("any"):
            record = self.instances.get(view.instance_id)
            if record is not None:
                served.setdefault(record.info.model, record.info.max_model_len)
        return served
