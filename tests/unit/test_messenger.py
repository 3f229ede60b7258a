"""The KV messaging thread survives a peer dropped mid-poll and any crash of its loop."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from pdserve.kv.messages import Ack, InjectFault, StoreSet
from pdserve.kv.messenger import Messenger, kv_codec
from pdserve.protocol.net import free_port

SECRET = b"messenger-test"


def address() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def acking_server(bind: str | None, on_store_set: Any = None, delay_s: float = 0.0) -> Messenger:
    """A messenger that answers every request with an Ack (``delay_s`` later)."""
    holder: list[Messenger] = []

    def on_request(identity: bytes, message: Any) -> None:
        def answer() -> None:
            holder[0].reply(identity, Ack(rid=message.rid))

        if delay_s:
            threading.Timer(delay_s, answer).start()
        else:
            answer()

    server = Messenger(
        kv_codec(SECRET), bind, on_request=on_request, on_store_set=on_store_set or (lambda s: None)
    )
    holder.append(server)
    return server


def ask(messenger: Messenger, target: str, timeout_s: float = 5.0) -> Any:
    rid, box = messenger.new_request()
    try:
        messenger.send(target, InjectFault(rid=rid, delay_s=0.0))
        return box.get(timeout=timeout_s)
    finally:
        messenger.forget(rid)


def test_dropping_a_peer_whose_reply_is_in_the_poll_results_keeps_the_thread_alive() -> None:
    # A's I/O thread is held inside a StoreSet arriving on its ROUTER while B's reply lands on
    # A's DEALER and a drop of B is queued: A's next poll returns both the DEALER and the
    # wake-up pipe, and the drop is handled before the DEALER is read.
    entered, resume = threading.Event(), threading.Event()

    def hold(message: StoreSet) -> None:
        entered.set()
        resume.wait(10)

    a_address, b_address = address(), address()
    a = acking_server(a_address, on_store_set=hold)
    b = acking_server(b_address, delay_s=0.3)
    c = acking_server(None)
    try:
        rid, _ = a.new_request()
        a.send(b_address, InjectFault(rid=rid, delay_s=0.0))  # B answers 0.3 s later
        time.sleep(0.1)
        c.send(a_address, StoreSet(pair_id="p", key="k", value=b"v"))
        assert entered.wait(5)
        time.sleep(0.5)  # B's reply now waits in A's DEALER (A's thread is held)
        a.drop_peer(b_address)
        resume.set()
        time.sleep(0.3)
        assert a._thread.is_alive()
        assert a.restarts == 0, "the loop skips a socket closed during the iteration"
        # A still serves requests and still reaches B (over a new DEALER).
        assert isinstance(ask(c, a_address), Ack)
        assert isinstance(ask(a, b_address), Ack)
    finally:
        resume.set()
        for m in (a, b, c):
            m.stop()


def test_a_crash_in_the_loop_is_logged_counted_and_survived(caplog: Any) -> None:
    server_address = address()
    server = acking_server(server_address)
    client = acking_server(None)
    real_flush = server._flush_outbox
    crashes: queue.SimpleQueue[int] = queue.SimpleQueue()

    def flaky_flush() -> None:
        if crashes.empty():
            crashes.put(1)
            raise RuntimeError("injected messenger crash")
        real_flush()

    server._flush_outbox = flaky_flush  # type: ignore[method-assign]
    try:
        with caplog.at_level("ERROR"):
            # The crash hits the iteration that handles this request's wake-up.
            reply = ask(client, server_address)
        assert isinstance(reply, Ack)
        assert server.restarts == 1
        assert server._thread.is_alive()
        assert "injected messenger crash" in caplog.text
        assert isinstance(ask(client, server_address), Ack)
    finally:
        client.stop()
        server.stop()


def test_what_was_sent_just_before_a_drop_still_reaches_a_live_peer() -> None:
    """A peer found silent may only have been slow: the PairClose or Release sent right
    before dropping it must still reach it (only a backlog for a dead peer is discarded)."""
    received: queue.SimpleQueue[Any] = queue.SimpleQueue()
    server_address = address()
    server = Messenger(
        kv_codec(SECRET),
        server_address,
        on_request=lambda identity, message: received.put(message),
        on_store_set=lambda s: None,
    )
    client = acking_server(None)
    try:
        for n in range(5):  # each on a connection not made yet when the drop comes
            client.send(server_address, InjectFault(rid=n, delay_s=0.0))
            client.drop_peer(server_address)
            message = received.get(timeout=5)
            assert isinstance(message, InjectFault) and message.rid == n
        assert client.restarts == 0
    finally:
        client.stop()
        server.stop()
