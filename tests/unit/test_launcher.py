"""Layouts ``pdserve serve`` accepts, refuses, and how it shares cores."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from pdserve.cluster import launcher
from pdserve.cluster.launcher import ServeSettings, assign_cores, plan
from pdserve.cluster.processes import ManagedProcess, free_port
from pdserve.gateway.settings import GatewaySettings


def gateway() -> GatewaySettings:
    return GatewaySettings(port=free_port(), control_port=free_port())


def test_own_cores_when_there_are_enough() -> None:
    assert assign_cores(2, [0, 1]) == (["0", "1"], False)
    assert assign_cores(2, [0, 1, 2, 3]) == (["0,1", "2,3"], False)


def test_shared_cores_when_there_are_not() -> None:
    assert assign_cores(3, [0, 1]) == (["nobind", "nobind", "nobind"], True)


def test_plan_names_instances_by_role(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "available_cores", lambda: [0, 1])
    slots, warnings = plan(ServeSettings(prefill=1, decode=2), gateway())
    assert [s.name for s in slots] == ["prefill-0", "decode-0", "decode-1"]
    assert len({s.port for s in slots}) == 3
    assert warnings and "share" in warnings[0]


def test_plan_starts_a_cluster_without_decode_instances_and_says_how_it_serves() -> None:
    """Roles are preferences: prefill instances serve whole requests, no refusal."""
    slots, warnings = plan(ServeSettings(prefill=1, decode=0), gateway())
    assert [s.name for s in slots] == ["prefill-0"]
    assert any("served whole" in w for w in warnings)


def test_plan_refuses_a_cluster_without_instances() -> None:
    with pytest.raises(ValueError, match="no instance"):
        plan(ServeSettings(prefill=0, decode=0), gateway())


def test_plan_refuses_a_port_in_use() -> None:
    settings = gateway()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", settings.port))
        busy.listen()
        with pytest.raises(ValueError, match="in use"):
            plan(ServeSettings(), settings)


def test_watch_starts_again_what_dies_then_gives_up(tmp_path: Path) -> None:
    """A dying instance is restarted up to max_restarts times; a gateway out of restarts ends it."""
    from pdserve.instance.settings import InstanceSettings

    serve = ServeSettings(max_restarts=2, log_dir=str(tmp_path))
    cluster = launcher.Cluster(serve, gateway(), [], InstanceSettings(), [])
    dies = [sys.executable, "-c", "import sys; print('up'); sys.exit(3)"]
    cluster.processes = [
        ManagedProcess("gateway", dies, tmp_path / "gateway.log"),
        ManagedProcess("decode-0", dies, tmp_path / "decode-0.log"),
    ]
    try:
        assert cluster.watch() == 1
    finally:
        cluster.stop()
    # Each ran once plus two restarts, all into the same log.
    assert (tmp_path / "gateway.log").read_text().count("up") == 3
    assert (tmp_path / "decode-0.log").read_text().count("up") == 3


def test_a_log_tail_leads_with_the_root_cause(tmp_path: Path) -> None:
    """vLLM's first traceback (the cause) comes before the tail of "see root cause above"."""
    log = tmp_path / "instance.log"
    lines = ["start", "Traceback (most recent call last):", "OSError: the real cause"]
    lines += [f"wrapper {i}" for i in range(100)]
    log.write_text("\n".join(lines))
    tail = ManagedProcess("decode-0", [sys.executable, "-c", "pass"], log).log_tail(10)
    assert tail.splitlines()[1] == "OSError: the real cause"
    assert tail.splitlines()[-1] == "wrapper 99"
    log.write_text("\n".join(["Traceback (most recent call last):", "ValueError: x"]))
    assert "[...]" not in ManagedProcess("p", ["true"], log).log_tail(10)
