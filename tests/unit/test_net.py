"""Ports handed to instances that bind them late lie below the kernel's ephemeral range."""

from __future__ import annotations

import socket
import time

import pytest

from pdserve.protocol import net

pytestmark = pytest.mark.unit


def test_free_ports_are_below_the_ephemeral_range_and_free() -> None:
    low, _ = net.ephemeral_range()
    for _ in range(20):
        port = net.free_port()
        assert port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free indeed


def test_a_port_in_use_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        # The only candidates: the port in use and the one below it.
        monkeypatch.setattr(net, "ephemeral_range", lambda: (taken + 1, taken + 2))
        monkeypatch.setattr(net, "_WINDOW", 2)
        picks = {net.free_port() for _ in range(30)}
    assert taken not in picks


def _port_in_time_wait() -> int:
    """A port whose accepted connection this side closed first: it lingers in TIME_WAIT,
    which a bind with SO_REUSEADDR ignores and a plain bind does not."""
    with socket.socket() as listener:
        # As servers bind (uvicorn, ZeroMQ): a TIME_WAIT left by a socket without the option
        # blocks every later bind on Linux, with it only the binds without it.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = int(listener.getsockname()[1])
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the active close: this side's end goes to TIME_WAIT
        client.recv(1)
        client.close()
    deadline = time.monotonic() + 2
    while net.port_in_use("127.0.0.1", port) and time.monotonic() < deadline:
        time.sleep(0.01)  # until the last ACK moved it from FIN_WAIT to TIME_WAIT
    return port


def test_a_port_in_time_wait_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    lingering = _port_in_time_wait()
    assert not net.port_in_use("127.0.0.1", lingering)  # our servers could restart on it
    assert net.port_in_use("127.0.0.1", lingering, reuse_addr=False)
    monkeypatch.setattr(net, "ephemeral_range", lambda: (lingering + 1, lingering + 2))
    monkeypatch.setattr(net, "_WINDOW", 2)
    assert lingering not in {net.free_port() for _ in range(30)}
