"""A ``pdserve serve`` cluster for a benchmark: started, waited for, always stopped.

Benchmarks that need a fresh cluster per setting (on or off, one length or another) use
:func:`serve_cluster`; it yields the endpoint's URL once ``expected`` instances are healthy.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pdserve.cluster.processes import ManagedProcess, free_port, pdserve_argv, wait_until

START_TIMEOUT_S = 900.0


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def post_json(url: str, body: Any, timeout: float = 600.0) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def healthy_instances(url: str) -> list[dict[str, Any]]:
    try:
        rows = get_json(url + "/admin/instances", timeout=5)
    except OSError:
        return []
    return [row for row in rows if row.get("healthy")]


@contextlib.contextmanager
def serve_cluster(args: Sequence[str], expected: int, log_dir: Path | None = None) -> Iterator[str]:
    """Runs ``pdserve serve ARGS`` on free ports until the block ends."""
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="pdserve-bench-"))
    port, control_port = free_port(), free_port()
    argv = pdserve_argv(
        "serve", "--port", str(port), "--control-port", str(control_port),
        "--log-dir", str(log_dir), *args,
    )  # fmt: skip
    process = ManagedProcess("pdserve-serve", argv, log_dir / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: len(healthy_instances(url)) >= expected,
            START_TIMEOUT_S,
            f"pdserve serve {' '.join(args)}",
            [process],
        )
        yield url
    finally:
        process.stop(grace_s=30)
