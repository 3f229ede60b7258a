"""Small helpers that several layers need: ports, addresses, CPU cores, argv flags, blocks.

They live at the bottom so that no layer imports an upper one for a three-line function.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
from collections.abc import Sequence


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# Where ports are picked when the ephemeral range starts too low to leave room below it.
_FALLBACK_LOW = 20000
# How many ports below the range are candidates.
_WINDOW = 12288
_PICK_ATTEMPTS = 200


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out for ``bind(port 0)`` and outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now, *below* the kernel's ephemeral range.

    The caller binds it late: a vLLM instance binds its HTTP and KV ports only after its
    model has loaded (~30 s here). A port from ``bind(port 0)`` lies in the ephemeral range,
    where every other process starting meanwhile (vLLM's own ZeroMQ sockets, outgoing
    connections) gets its ports too, and one took a KV port in CI ("Address already in
    use" at start-up). Below the range only processes that ask for a port by number get it.
    """
    low, _ = ephemeral_range()
    start = max(1024, low - _WINDOW) if low > 4096 else _FALLBACK_LOW
    end = low if low > 4096 else _FALLBACK_LOW + _WINDOW
    rng = random.SystemRandom()
    for _ in range(_PICK_ATTEMPTS):
        port = rng.randrange(start, end)
        if not port_in_use(host, port, reuse_addr=False):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int, *, reuse_addr: bool = True) -> bool:
    """Whether a bind fails. With ``reuse_addr`` (how our servers bind) a port whose
    closed connection lingers in TIME_WAIT is free, so a restart on a fixed port is not
    refused; without it such a port counts as in use, as it does for a binder that does
    not set SO_REUSEADDR (``free_port`` hands out only ports any binder can take)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse_addr:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def available_cores() -> list[int]:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def has_flag(args: Sequence[str], flag: str) -> bool:
    """Whether ``flag`` is in an argv, as ``--flag value`` or ``--flag=value``."""
    return any(a == flag or a.startswith(flag + "=") for a in args)


def cdiv(a: int, b: int) -> int:
    """Ceiling division: blocks needed for ``a`` tokens at ``b`` tokens per block."""
    return -(-a // b)
