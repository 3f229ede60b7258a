"""A ``pdserve serve`` cluster that a benchmark starts on free ports and always stops.

The benchmarks that need to know more than the endpoint use it: the cluster secret (to send
requests straight to an instance, past the gateway) and the launcher's pid (to find every
process of the cluster). ``instances`` reads the gateway's ``GET /admin/instances``, the one
place that lists each instance's URL, pid and KV blocks, for clusters started here or not; it is
the benchmarks' only reader of that table (``pdserve.cluster.launcher`` has its own, below
benchmark in the layers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from pdserve.cluster.launcher import ServeSettings, gateway_instances
from pdserve.cluster.processes import ManagedProcess, free_port, pdserve_argv, wait_until
from pdserve.protocol.net import is_loopback
from pdserve.protocol.wire import SECRET_ENV, cluster_secret, new_secret
from pdserve.settings import add_arguments, from_args

INSTANCES_PATH = "/admin/instances"
M = TypeVar("M", bound=BaseModel)


@dataclass
class LocalCluster:
    """A running ``pdserve serve``: its endpoint, secret, launcher process and logs."""

    url: str
    secret: bytes
    process: ManagedProcess
    log_dir: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def get_json(url: str, api_key: str | None = None, timeout: float = 5.0) -> Any:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def instances_url(gateway_url: str) -> str:
    return gateway_url.rstrip("/") + INSTANCES_PATH


def instances(url: str, api_key: str | None = None, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The instance table of the gateway at ``url``; [] while it does not answer."""
    return gateway_instances(url, api_key, timeout)


def healthy(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if row.get("healthy")]


def secret_for(url: str) -> bytes:
    """The secret of a cluster started elsewhere: ``$PDSERVE_CLUSTER_SECRET``, or the
    development default that a cluster on loopback uses without one."""
    host = urllib.parse.urlsplit(url).hostname or ""
    return cluster_secret(loopback_only=is_loopback(host))


def serve_settings(model: type[M], serve_args: Sequence[str]) -> M:
    """The ``model`` settings (``ServeSettings``, ``DispatchSettings``...) that ``pdserve serve
    SERVE_ARGS`` runs with, read by the model's own flags; other arguments are left alone.

    Raises ``argparse.ArgumentError`` or pydantic's ``ValidationError`` where pdserve serve
    would refuse the arguments.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    add_arguments(parser, model)
    namespace, _ = parser.parse_known_args(list(serve_args))
    return from_args(model, namespace)


def expected_instances(serve_args: Sequence[str]) -> int:
    """How many instances ``pdserve serve SERVE_ARGS`` starts."""
    serve = serve_settings(ServeSettings, serve_args)
    return serve.prefill + serve.decode + serve.both


@contextlib.contextmanager
def local_cluster(
    serve_args: Sequence[str],
    expected: int,
    log_dir: str | None = None,
    start_timeout_s: float = 900.0,
    api_key: str | None = None,
) -> Iterator[LocalCluster]:
    """Runs ``pdserve serve SERVE_ARGS`` on free ports until ``expected`` instances are
    healthy, yields it, and stops the whole cluster when the block ends (also on errors).

    ``api_key``: the gateway's ``--api-key``, if SERVE_ARGS give it one.
    """
    logs = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="pdserve-bench-"))
    port, control_port = free_port(), free_port()
    secret = new_secret()
    argv = pdserve_argv(
        "serve",
        "--port",
        str(port),
        "--control-port",
        str(control_port),
        "--log-dir",
        str(logs),
        *serve_args,
    )
    env = dict(os.environ) | {SECRET_ENV: secret}
    process = ManagedProcess("pdserve-serve", argv, logs / "serve.log", env=env)
    cluster = LocalCluster(f"http://127.0.0.1:{port}", secret.encode(), process, logs)
    try:
        wait_until(
            lambda: len(healthy(instances(cluster.url, api_key))) >= expected,
            start_timeout_s,
            f"pdserve serve {' '.join(serve_args)} ({expected} instances; logs in {logs})",
            [process],
            interval_s=1.0,
        )
        yield cluster
    finally:
        # The launcher stops its instances on SIGTERM, each with its own grace period.
        process.stop(grace_s=90)
