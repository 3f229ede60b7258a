"""Session-wide real vLLM processes, started once and always stopped.

``reference``: one plain vLLM instance (no pdserve code) whose greedy outputs are the truth.
``cluster``: ``pdserve serve`` with 1 prefill + 2 decode instances that disaggregates every
request (no short-prompt or saturation shortcut), with fault injection enabled for failure tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import PlainVLLM, ServeCluster

CLUSTER_ARGS = (
    "--prefill 1 --decode 2 --short-prompt-tokens 0 --prefill-saturation-s 100000 "
    "--kv-cache-gib 1 --kv-transfer-timeout-s 8"
).split()


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def _processes(logs: Path) -> Iterator[dict[str, object]]:
    """Starts the reference and the cluster together: their start-ups overlap."""
    started: dict[str, object] = {}
    try:
        started["reference"] = PlainVLLM.start(logs / "reference")
        started["cluster"] = ServeCluster.start(
            logs / "cluster", *CLUSTER_ARGS, expected=3, env={"PDSERVE_FAULT_INJECTION": "1"}
        )
        yield started
    finally:
        for item in started.values():
            with contextlib.suppress(Exception):
                item.process.stop(grace_s=20)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def reference(_processes: dict[str, object]) -> PlainVLLM:
    ref = _processes["reference"]
    assert isinstance(ref, PlainVLLM)
    ref.wait()
    return ref


@pytest.fixture(scope="session")
def cluster(_processes: dict[str, object]) -> ServeCluster:
    served = _processes["cluster"]
    assert isinstance(served, ServeCluster)
    served.wait()
    return served
