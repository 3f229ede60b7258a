"""Whether the peers of a KV worker are alive: Ping/Pong probes over its messenger.

A worker's KV server answers ``Ping`` with ``Pong`` on its messenger's I/O thread, never on
a serving thread, so a busy exporter still answers at once and a silent one is gone
(``KVFailure.PEER_GONE``) after ``--kv-pair-probe-timeout-s``. ``PeerWatch`` probes:

- on demand, while a pull waits for a reply (``reply``): a dead exporter fails the pull in
  seconds instead of after its transfer timeout;
- every ``PEER_CHECK_INTERVAL_S``, on its own thread, the peers of pairs idle that long or
  still forming (in both directions: a worker that only serves a peer learns of its death
  here too), all pinged at once; the worker then drops every pair with a peer that does not
  answer, so a killed peer's pairs are gone within about ``2 * interval + probe timeout``,
  and the pairs formed with an earlier start of a peer that answers as another one
  (``Pong.incarnation``): restarted on the same address, it knows none of them.

Before a pair forms, the server's ``PairOpened`` is the probe (see ``KVWorker``). This
module imports no torch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pdserve.kv.messages import KVError, KVFailure, KVTimeout, Ping, Pong, another_start
from pdserve.kv.messenger import Messenger
from pdserve.logs import get_logger

if TYPE_CHECKING:
    from pdserve.kv.transport import Pair

logger = get_logger(__name__)

# A reply this late makes the importer ping the exporter.
PROBE_AFTER_SILENCE_S = 0.5

# How often the peers of idle pairs are probed (one Ping per such peer and interval): short,
# so that pairs with a killed peer (~100 MB of GPU memory each with NCCL) go within seconds.
PEER_CHECK_INTERVAL_S = 1.0


class PeerWatch:
    """The liveness probes of one worker, and its thread (``pdserve-kv-liveness``)."""

    def __init__(
        self,
        messenger: Messenger,
        probe_s: float,
        pairs: Callable[[], list[Pair]],
        drop_peer: Callable[[str], None],
        drop_stale: Callable[[str, list[Pair]], None],
    ) -> None:
        self._messenger = messenger
        self.probe_s = probe_s
        self._pairs = pairs
        self._drop_peer = drop_peer
        self._drop_stale = drop_stale
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-kv-liveness", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread (it may still finish a probe it started, within ``probe_s``)."""
        self._stopping.set()

    def probe(self, address: str) -> bool:
        """Whether the KV server at ``address`` answers a Ping in time (blocks that long)."""
        return address in self.answering([address])

    def answering(self, addresses: Iterable[str]) -> dict[str, str]:
        """Those of the KV servers that answer a Ping within ``probe_s``, with the
        incarnation each answered as.

        Every one is pinged at once, so a round takes ``probe_s`` at most, however many of
        them are silent (one after the other, each silent peer would add ``probe_s``).
        """
        box: queue.SimpleQueue[object] = queue.SimpleQueue()
        asked: dict[int, str] = {}
        for address in addresses:
            rid, _ = self._messenger.new_request(box)
            asked[rid] = address
            self._messenger.send(address, Ping(rid=rid))
        answered: dict[str, str] = {}
        deadline = time.monotonic() + self.probe_s
        try:
            while len(answered) < len(set(asked.values())):
                try:
                    reply = box.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if isinstance(reply, Pong) and reply.rid in asked:
                    answered[asked[reply.rid]] = reply.incarnation
        finally:
            for rid in asked:
                self._messenger.forget(rid)
        return answered

    def reply(
        self, box: queue.SimpleQueue[object], deadline: float, address: str, incarnation: str = ""
    ) -> object:
        """The next reply in ``box`` by the deadline, watching that the peer is alive.

        Whenever the peer is silent for ``PROBE_AFTER_SILENCE_S`` it is pinged (the Pong
        lands in the same mailbox); a ping unanswered within ``probe_s`` means it is gone:
        ``KVError(PEER_GONE)``. A busy but live exporter answers pings on its I/O thread,
        so its slow replies are still waited for, up to the deadline (``KVTimeout``). A Pong
        from another start than ``incarnation`` (the pair's peer; "" unknown) means it
        restarted and knows neither the pair nor the pull: ``KVError(UNKNOWN_PAIR)`` at once.
        """
        ping_rid: int | None = None
        waited_since = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise KVTimeout("the exporting worker did not answer in time")
                patience = self.probe_s if ping_rid is not None else PROBE_AFTER_SILENCE_S
                try:
                    reply = box.get(timeout=max(0.0, min(deadline, waited_since + patience) - now))
                except queue.Empty:
                    if time.monotonic() >= deadline:
                        continue  # a timeout, raised above
                    if ping_rid is not None:
                        raise KVError(
                            KVFailure.PEER_GONE,
                            f"{address} answered no ping in {self.probe_s:.1f} s",
                        ) from None
                    ping_rid, _ = self._messenger.new_request(box)
                    self._messenger.send(address, Ping(rid=ping_rid))
                    waited_since = time.monotonic()
                    continue
                if isinstance(reply, Pong):
                    if another_start(incarnation, reply.incarnation):
                        raise KVError(KVFailure.UNKNOWN_PAIR, f"{address} restarted")
                    self._messenger.forget(reply.rid)
                    ping_rid, waited_since = None, time.monotonic()
                    continue
                return reply
        finally:
            if ping_rid is not None:
                self._messenger.forget(ping_rid)

    def _run(self) -> None:
        while not self._stopping.wait(PEER_CHECK_INTERVAL_S):
            try:
                self.check_peers()
            except Exception:
                logger.exception("pdserve kv: checking peers failed")

    def check_peers(self) -> None:
        """Probes the peers of idle pairs, all at once; drops those that are gone, and the
        pairs with an earlier start of those that restarted.

        A pair in use or used within the interval says enough (a transfer on it fails by
        itself if the peer dies), so its peer is left alone. A pair still forming is not:
        its rendezvous would wait for a dead peer for the whole set-up timeout.
        """
        now = time.monotonic()
        # Each pair with its peer's start as known before the pings (a PairOpened arriving
        # during the round, from a newer start, must not count against this round's Pong).
        peers: dict[str, list[tuple[Pair, str]]] = {}
        for pair in self._pairs():
            if pair.peer_address:
                peers.setdefault(pair.peer_address, []).append((pair, pair.peer_incarnation))
        idle = [
            address
            for address, pairs in peers.items()
            if not any(
                p.lock.locked() or now - p.last_used < PEER_CHECK_INTERVAL_S for p, _ in pairs
            )
        ]
        if not idle or self._stopping.is_set():
            return
        answered = self.answering(idle)
        for address in idle:
            if self._stopping.is_set():
                return
            if address not in answered:
                self._drop_peer(address)
                continue
            stale = [p for p, was in peers[address] if another_start(was, answered[address])]
            if stale:
                self._drop_stale(address, stale)
