"""Ports handed to instances that bind them late lie below the kernel's ephemeral range."""

from __future__ import annotations

import socket

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
