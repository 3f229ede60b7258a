"""KV faults of issue 11 (4 and 10), each pinned by a test: KV that does not exist yet is
never pinned nor copied, and a dead peer is found out in seconds (before, while and after a
pair forms), its pairs dropped within seconds and the export of a failed load released at
once, also when the exporter was only slow to answer.

Workers pair over gloo in one process, on fake caches (block b of an exporter holds b).
"""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from vllm.v1.request import RequestStatus

from pdserve.kv import liveness
from pdserve.kv.exports import ExportRegistry, Refusal
from pdserve.kv.liveness import PeerWatch
from pdserve.kv.messages import (
    Failed,
    KVError,
    KVFailure,
    PairOpen,
    PairOpened,
    Pin,
    Pinned,
    Pong,
    PullRequest,
    StoreSet,
)
from pdserve.kv.messenger import Messenger, kv_codec
from pdserve.kv.metadata import PROTOCOL_VERSION, ExportOrder, ExportUpdate
from pdserve.kv.worker_side import KVWorker
from pdserve.protocol.net import free_port
from tests.unit.kv_fakes import FakeControl, FakeSchedulerOutput
from tests.unit.test_kv_scheduler_side import TOKENS, control, orders, running, side
from tests.unit.test_kv_transfers import idle, load, pulled, wait_for
from tests.unit.test_kv_transfers import make_worker as make_any_worker
from tests.unit.test_kv_transfers import restarted as restart_any


def make_worker(name: str, filled: bool, **settings: Any) -> tuple[KVWorker, Any]:
    """A worker whose peers count as gone after 1 s without an answer."""
    return make_any_worker(name, filled, **{"pair_probe_timeout_s": 1.0, **settings})


def restarted(name: str, port: int) -> KVWorker:
    return restart_any(name, port, pair_probe_timeout_s=1.0)


# --- fault 4: KV that is not there yet is never pinned nor copied ----------------------------


def test_pin_of_a_request_recomputing_its_kv_is_refused() -> None:
    scheduler = side()
    request = running(scheduler, "key-1", [3, 4, 5])
    # Preempted, then running again: only its first 4 of 10 tokens have KV so far.
    request.num_computed_tokens = 4
    (reply,) = control(scheduler, Pin(rid=1, request_key="key-1", transfer_id="mig"))
    assert isinstance(reply, Failed) and reply.code is KVFailure.RECOMPUTING
    assert not orders(scheduler).exports, "nothing is exported"
    # Once the KV is back (all but the last sampled token), the pin goes through.
    request.num_computed_tokens = 9
    (reply,) = control(scheduler, Pin(rid=2, request_key="key-1", transfer_id="mig"))
    assert isinstance(reply, Pinned) and reply.num_computed_tokens == 9


def _pull(needs_tokens: int, count: int, last: bool = False) -> PullRequest:
    return PullRequest(
        rid=1,
        transfer_id="mig",
        pair_id="p",
        seq=0,
        first=0,
        dst=list(range(count)),
        last=last,
        needs_tokens=needs_tokens,
    )


def test_a_live_export_serves_only_positions_its_request_has_computed() -> None:
    scheduler = side()
    request = running(scheduler, "key-1", [3, 4, 5])
    request.num_computed_tokens = 9  # tokens 0..8 have KV; block 5 is only partly filled
    scheduler._control = FakeControl()  # type: ignore[assignment]
    scheduler._receive_control(b"gateway", Pin(rid=1, request_key="key-1", transfer_id="mig"))
    registry = ExportRegistry()
    (export,) = orders(scheduler).exports
    assert export.num_computed_tokens == 9
    registry.add(export)
    refused = registry.begin_pull(_pull(needs_tokens=12, count=3))
    assert isinstance(refused, Refusal) and refused.failure is KVFailure.NOT_COMPUTED
    claimed = registry.begin_pull(_pull(needs_tokens=8, count=2))
    assert not isinstance(claimed, Refusal) and claimed[1] == [3, 4]
    registry.end_pull(claimed[0])
    # It decodes on: 13 positions computed, a fourth block allocated.
    request.all_token_ids = [*TOKENS, 1, 2, 3, 4]
    request.num_computed_tokens = 13
    scheduler._kv_cache_manager.blocks["req-r"] = [3, 4, 5, 6]  # type: ignore[union-attr]
    (update,) = orders(scheduler).updates
    assert update.num_computed_tokens == 13 and update.block_ids == [3, 4, 5, 6]
    registry.update(update)
    claimed = registry.begin_pull(_pull(needs_tokens=12, count=3))
    assert not isinstance(claimed, Refusal) and claimed[1] == [3, 4, 5]
    registry.end_pull(claimed[0])


def test_the_cut_pull_waits_for_the_step_that_reports_its_positions() -> None:
    """The gateway cuts right after a token and the target pulls at once: the exporter may
    not know yet that the source computed the positions the pull relies on. The pull waits
    for the next step's update instead of being refused (the target would recompute)."""
    registry = ExportRegistry()
    registry.add(ExportOrder("mig", "req-r", [3, 4, 5], 30.0, owns=False, num_computed_tokens=9))
    later = threading.Timer(
        0.1, registry.update, [ExportUpdate("mig", "req-r", num_computed_tokens=12)]
    )
    later.start()
    started = time.monotonic()
    claimed = registry.begin_pull(_pull(needs_tokens=12, count=3))
    assert not isinstance(claimed, Refusal), claimed
    assert 0.05 < time.monotonic() - started < 1.5
    registry.end_pull(claimed[0])


def test_a_pinned_request_that_ends_hands_over_only_its_computed_blocks() -> None:
    scheduler = side()
    request = running(scheduler, "key-1", [3, 4, 8, 12])
    control(scheduler, Pin(rid=1, request_key="key-1", transfer_id="mig"))
    request.status = RequestStatus.FINISHED_ABORTED
    # 10 positions computed: blocks 3, 4 and 8; block 12 was allocated ahead, it holds none.
    assert scheduler.request_finished(request, [3, 4, 8, 12]) == (True, None)  # type: ignore[arg-type]
    (update,) = orders(scheduler).updates
    assert update.owns and update.block_ids == [3, 4, 8] and update.num_computed_tokens == 10


def test_a_preempted_then_recomputing_pinned_request_cannot_be_pinned_again() -> None:
    scheduler = side()
    request = running(scheduler, "key-1", [3, 4, 8])
    control(scheduler, Pin(rid=1, request_key="key-1", transfer_id="mig"))
    (update,) = scheduler.build_orders(FakeSchedulerOutput({"req-r"})).updates  # type: ignore[arg-type]
    assert update.void
    request.num_computed_tokens = 0  # vLLM resets it on preemption, then recomputes
    (reply,) = control(scheduler, Pin(rid=2, request_key="key-1", transfer_id="mig-2"))
    assert isinstance(reply, Failed) and reply.code is KVFailure.RECOMPUTING


def test_a_release_after_the_export_ended_leaves_no_tombstone() -> None:
    registry = ExportRegistry()
    registry.add(ExportOrder("mig", "req", [1], lease_s=30))
    claimed = registry.begin_pull(_pull(needs_tokens=0, count=1, last=True))
    assert not isinstance(claimed, Refusal)
    registry.end_pull(claimed[0])
    # The importer's best-effort release of a load that failed after the claim.
    registry.release("mig", tombstone_s=60)
    assert not registry._tombstones and len(registry) == 0


# --- fault 10: a dead exporter is found out in seconds -----------------------------------------


def test_a_dead_exporter_fails_a_load_in_seconds_not_the_pair_setup_timeout() -> None:
    exporter, _ = make_worker("exporter", True)
    address = exporter.address
    exporter.shutdown()  # gone before anyone paired with it
    importer, _ = make_worker("importer", False, pair_setup_timeout_s=30.0)
    try:
        started = time.monotonic()
        result = load(importer, "t", address, [1])
        assert not result.ok and result.failure is KVFailure.PEER_GONE
        assert time.monotonic() - started < 3.0, "the probe, not the 30 s set-up, decided"
        assert idle(importer, pairs=0)
    finally:
        importer.shutdown()


def test_an_exporter_dying_after_pairing_fails_the_next_load_in_seconds() -> None:
    exporter, _ = make_worker("exporter", True)
    importer, cache = make_worker("importer", False, transfer_timeout_s=20.0)
    try:
        exporter.add_export(ExportOrder("a", "p-a", [3], lease_s=30))
        pulled(importer, "a", exporter.address, [1])
        assert importer.holdings().open_pairs == 1
        exporter.shutdown()
        started = time.monotonic()
        result = load(importer, "b", exporter.address, [2])
        assert not result.ok and result.failure is KVFailure.PEER_GONE
        assert time.monotonic() - started < 4.0, "not the 20 s transfer timeout"
        assert idle(importer, pairs=0), "the pair with the dead peer is dropped"
        assert torch.all(cache["layers.0"][2] == 0)
    finally:
        importer.shutdown()


def test_pairs_with_a_peer_that_no_longer_answers_are_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(liveness, "PEER_CHECK_INTERVAL_S", 0.3)
    exporter, _ = make_worker("exporter", True)
    importer, _ = make_worker("importer", False)
    try:
        exporter.add_export(ExportOrder("a", "p-a", [3], lease_s=30))
        pulled(importer, "a", exporter.address, [1])
        wait_for(lambda: idle(exporter, pairs=1), 5, "the exporter serving one pair")
        time.sleep(1.0)
        assert idle(exporter, pairs=1), "a live peer keeps its pair"
        importer.shutdown()  # the importer dies: it never closes its pair
        wait_for(lambda: idle(exporter, pairs=0), 5, "the exporter dropping the dead peer's pair")
    finally:
        importer.shutdown()
        exporter.shutdown()


def test_a_peer_that_pairs_again_replaces_its_old_pair() -> None:
    exporter, _ = make_worker("exporter", True)
    importer, _ = make_worker("importer", False)
    port = importer.settings.port
    try:
        exporter.add_export(ExportOrder("a", "p-a", [3], lease_s=30))
        pulled(importer, "a", exporter.address, [1])
        importer.shutdown()  # restarts on the same port; its PairClose never went out
        importer = restarted("importer", port)
        exporter.add_export(ExportOrder("b", "p-b", [4], lease_s=30))
        pulled(importer, "b", exporter.address, [2])
        wait_for(lambda: idle(exporter, pairs=1), 5, "one pair per peer on the exporter")
    finally:
        importer.shutdown()
        exporter.shutdown()


@pytest.mark.parametrize("who", ["importer", "exporter"])
def test_pairs_with_a_peer_restarted_on_its_address_go_although_it_answers(
    who: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Back on the same address before any probe went unanswered, and never pairing again:
    the pairs with its earlier start must still go in seconds, on the side that survived."""
    monkeypatch.setattr(liveness, "PEER_CHECK_INTERVAL_S", 0.3)
    workers = {"exporter": make_worker("exporter", True)[0]}
    workers["importer"] = make_worker("importer", False)[0]
    survivor = workers["exporter" if who == "importer" else "importer"]
    try:
        workers["exporter"].add_export(ExportOrder("a", "p-a", [3], lease_s=30))
        pulled(workers["importer"], "a", workers["exporter"].address, [1])
        wait_for(lambda: idle(survivor, pairs=1), 5, "one pair on the survivor")
        port = workers[who].settings.port
        workers[who].shutdown()
        workers[who] = restarted(who, port)  # at once: pings are answered again
        wait_for(lambda: idle(survivor, pairs=0), 5, "the stale pair to go")
    finally:
        for worker in workers.values():
            worker.shutdown()


def test_a_peer_restarted_at_once_that_pairs_with_us_replaces_our_pairs_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """B restarts and, as its new start, pulls from A: A's pair with B's earlier start goes
    then (the new start's PairOpen says who it is), not at a probe round."""
    monkeypatch.setattr(liveness, "PEER_CHECK_INTERVAL_S", 60.0)  # no round meanwhile
    a, _ = make_worker("a", True)
    b, _ = make_worker("b", True)
    try:
        b.add_export(ExportOrder("x", "p-x", [3], lease_s=30))
        pulled(a, "x", b.address, [1])  # A opened a pair with B
        port = b.settings.port
        b.shutdown()
        b = restarted("b", port)
        a.add_export(ExportOrder("y", "p-y", [4], lease_s=30))
        pulled(b, "y", a.address, [2])  # B's new start opens a pair with A
        wait_for(lambda: idle(a, pairs=1), 5, "A keeping only the new start's pair")
    finally:
        a.shutdown()
        b.shutdown()


def test_a_pull_waiting_on_a_peer_that_restarted_fails_at_its_first_pong() -> None:
    """The new start answers the pings: without comparing starts the pull would wait for the
    whole transfer timeout for a reply that cannot come."""
    address = f"tcp://127.0.0.1:{free_port()}"
    codec = kv_codec(b"kv-faults-test")

    def answer(identity: bytes, message: Any) -> None:
        server.reply(identity, Pong(rid=message.rid, incarnation="new start"))

    server = Messenger(codec, address, on_request=answer, on_store_set=print)
    client = Messenger(codec, None, on_request=lambda i, m: None, on_store_set=print)
    watch = PeerWatch(client, 1.0, list, print, print)
    try:
        started = time.monotonic()
        box: queue.SimpleQueue[object] = queue.SimpleQueue()
        with pytest.raises(KVError) as raised:
            watch.reply(box, started + 20.0, address, "earlier start")
        assert raised.value.failure is KVFailure.UNKNOWN_PAIR
        assert time.monotonic() - started < 3.0, "at the first Pong, not the 20 s deadline"
    finally:
        watch.stop()
        client.stop()
        server.stop()


def test_a_load_that_fails_before_claiming_its_export_releases_it() -> None:
    exporter, _ = make_worker("exporter", True)
    # Other planes: the pair is refused, so the pull never reaches the export.
    importer, _ = make_worker("importer", False, width=16)
    try:
        exporter.add_export(ExportOrder("a", "p-a", [3], lease_s=30))
        result = load(importer, "a", exporter.address, [1])
        assert not result.ok and result.failure is KVFailure.PLANE_MISMATCH
        freed: set[str] = set()
        deadline = time.monotonic() + 3
        while not freed and time.monotonic() < deadline:
            freed |= exporter.poll()[0]
            time.sleep(0.02)
        assert freed == {"p-a"}, "freed at once, not after the 30 s lease"
        assert idle(exporter, pairs=0) and idle(importer, pairs=0)
    finally:
        importer.shutdown()
        exporter.shutdown()


def test_a_ping_is_answered_by_a_busy_server() -> None:
    exporter, _ = make_worker("exporter", True)
    importer, _ = make_worker("importer", False)
    gate = threading.Event()
    try:
        for _ in range(8):
            exporter._serve_pool.submit(gate.wait, 30)
        assert importer._liveness.probe(exporter.address)
        exporter.shutdown()
        assert not importer._liveness.probe(exporter.address)
    finally:
        gate.set()
        importer.shutdown()
        exporter.shutdown()


# --- gone in seconds: pairs forming, pairs idle, exports of loads that gave up ----------------


def test_pairs_with_a_killed_peer_go_within_seconds_at_the_default_interval() -> None:
    """The leak invariant (at most two pairs per *live* peer) must hold seconds after a kill."""
    exporter, _ = make_worker("exporter", True)
    importer, _ = make_worker("importer", False)
    try:
        exporter.add_export(ExportOrder("a", "p-a", [3], lease_s=30))
        pulled(importer, "a", exporter.address, [1])
        wait_for(lambda: idle(exporter, pairs=1), 5, "the exporter serving one pair")
        importer.shutdown()  # killed: it never closes its pair
        killed = time.monotonic()
        wait_for(lambda: idle(exporter, pairs=0), 15, "the dead peer's pair to go")
        assert time.monotonic() - killed < 4.5, "interval + idle + probe, not 5 s intervals"
    finally:
        importer.shutdown()
        exporter.shutdown()


class _AcceptingThenSilent:
    """A KV server that accepts a pair (``PairOpened``) and then answers nothing more: an
    exporter killed while the pair's rendezvous runs."""

    def __init__(self) -> None:
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.rendezvous = threading.Event()
        self.messenger = Messenger(
            kv_codec(b"kv-transfers-test"),
            self.address,
            on_request=self._on_request,
            on_store_set=self._on_store_set,
        )

    def _on_request(self, identity: bytes, message: Any) -> None:
        if isinstance(message, PairOpen):
            self.messenger.reply(identity, PairOpened(rid=message.rid, protocol=PROTOCOL_VERSION))

    def _on_store_set(self, message: StoreSet) -> None:
        self.rendezvous.set()


def test_an_exporter_dying_while_the_pair_forms_fails_the_load_in_seconds() -> None:
    exporter = _AcceptingThenSilent()
    importer, _ = make_worker("importer", False, pair_setup_timeout_s=30.0)
    try:
        started = time.monotonic()
        result = load(importer, "t", exporter.address, [1])
        assert exporter.rendezvous.is_set(), "the rendezvous had begun"
        assert not result.ok and result.failure is KVFailure.PEER_GONE, result
        assert time.monotonic() - started < 6.0, "the probes, not the 30 s set-up, decided"
        assert idle(importer, pairs=0)
    finally:
        importer.shutdown()
        exporter.messenger.stop()


def test_silent_peers_are_probed_at_once_and_busy_ones_not_at_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(liveness, "PEER_CHECK_INTERVAL_S", 60.0)  # no round of its own
    messenger = Messenger(
        kv_codec(b"kv-faults-test"), None, on_request=lambda i, m: None, on_store_set=print
    )
    long_ago = time.monotonic() - 120

    def pair(last_used: float, locked: bool = False) -> Any:
        lock = threading.Lock()
        if locked:
            lock.acquire()
        address = f"tcp://127.0.0.1:{free_port()}"  # nobody there: it never answers
        ready = threading.Event()
        ready.set()
        return SimpleNamespace(
            peer_address=address, peer_incarnation="", lock=lock, last_used=last_used, ready=ready
        )

    silent = [pair(long_ago) for _ in range(3)]
    busy = [pair(long_ago, locked=True), pair(time.monotonic())]
    dropped: list[str] = []
    watch = PeerWatch(messenger, 1.0, lambda: [*silent, *busy], dropped.append, print)
    try:
        started = time.monotonic()
        watch.check_peers()
        assert time.monotonic() - started < 1.8, "one probe timeout in all, not one per peer"
        assert sorted(dropped) == sorted(p.peer_address for p in silent)
    finally:
        watch.stop()
        messenger.stop()


def test_a_load_given_up_on_a_slow_exporter_still_frees_its_export() -> None:
    """The exporter's I/O thread stalls past the probe timeout: the importer counts it gone
    (``peer_gone``) and computes the prompt itself, so the export must not wait 30 s for its
    lease: the Release (and the broken pair's PairClose) reach the exporter once it is back."""
    exporter, _ = make_worker("exporter", True)
    importer, _ = make_worker("importer", False)
    handle = exporter.messenger._on_request
    stalled: list[bool] = []

    def stall_first_pair_open(identity: bytes, message: Any) -> None:
        if isinstance(message, PairOpen) and not stalled:
            stalled.append(True)
            time.sleep(2.5)
        handle(identity, message)

    exporter.messenger._on_request = stall_first_pair_open
    try:
        exporter.add_export(ExportOrder("a", "p-a", [3], lease_s=30))
        result = load(importer, "a", exporter.address, [1])
        assert not result.ok and result.failure is KVFailure.PEER_GONE, result
        gave_up = time.monotonic()
        freed: set[str] = set()
        while not freed and time.monotonic() < gave_up + 5:
            freed |= exporter.poll()[0]
            time.sleep(0.02)
        assert freed == {"p-a"}, "freed once the exporter answers again, not after the lease"
        wait_for(lambda: idle(exporter, pairs=0) and idle(importer, pairs=0), 3, "no pairs")
    finally:
        importer.shutdown()
        exporter.shutdown()
