"""Exports are finished exactly once: pulled, released, or expired, whichever comes first."""

from __future__ import annotations

import threading
import time

from pdserve.kv.messages import PullRequest
from pdserve.kv.worker_side import ExportOrder, ExportRegistry


def drain(registry: ExportRegistry) -> list[str]:
    done = []
    while not registry.finished.empty():
        done.append(registry.finished.get_nowait())
    return done


def pull(
    transfer_id: str, blocks: list[int], wait_s: float = 0.0, last: bool = True
) -> PullRequest:
    runs = [(b, b, 1) for b in blocks]
    return PullRequest(
        rid=1, transfer_id=transfer_id, pair_id="p", seq=0, runs=runs, wait_s=wait_s, last=last
    )


def test_pull_finishes_the_export_once() -> None:
    registry = ExportRegistry()
    registry.add(ExportOrder("t1", "req-1", [3, 4], lease_s=30))
    export = registry.begin_pull(pull("t1", [3, 4]))
    assert not isinstance(export, str)
    assert drain(registry) == []  # blocks stay pinned while the pull runs
    registry.end_pull(export)
    assert drain(registry) == ["req-1"]
    registry.release("t1", tombstone_s=1)  # late release: nothing more
    registry.expire()
    assert drain(registry) == []


def test_release_while_pulling_waits_for_the_pull() -> None:
    registry = ExportRegistry()
    registry.add(ExportOrder("t1", "req-1", [1], lease_s=30))
    export = registry.begin_pull(pull("t1", [1]))
    assert not isinstance(export, str)
    registry.release("t1", tombstone_s=1)
    assert drain(registry) == []
    registry.end_pull(export)
    assert drain(registry) == ["req-1"]


def test_release_before_registration_is_remembered() -> None:
    registry = ExportRegistry()
    registry.release("t1", tombstone_s=5)
    registry.add(ExportOrder("t1", "req-1", [1], lease_s=30))
    assert drain(registry) == ["req-1"]


def test_lease_expiry_frees_unpulled_exports() -> None:
    registry = ExportRegistry()
    registry.add(ExportOrder("t1", "req-1", [1], lease_s=0.01))
    registry.add(ExportOrder("t2", "req-2", [2], lease_s=30))
    time.sleep(0.02)
    registry.expire()
    assert drain(registry) == ["req-1"]
    assert registry.expired_count == 1
    assert len(registry) == 1


def test_pull_outside_the_export_is_refused() -> None:
    registry = ExportRegistry()
    registry.add(ExportOrder("t1", "req-1", [1, 2], lease_s=30))
    assert isinstance(registry.begin_pull(pull("t1", [2, 3])), str)
    assert isinstance(registry.begin_pull(pull("nope", [1])), str)


def test_pull_waits_for_a_registration_on_its_way() -> None:
    registry = ExportRegistry()
    timer = threading.Timer(0.05, registry.add, [ExportOrder("t1", "req-1", [1], lease_s=30)])
    timer.start()
    export = registry.begin_pull(pull("t1", [1], wait_s=2))
    assert not isinstance(export, str)


def test_non_final_pulls_keep_the_export() -> None:
    registry = ExportRegistry()
    registry.add(ExportOrder("t1", "req-1", [1, 2], lease_s=30))
    first = registry.begin_pull(pull("t1", [1], last=False))
    assert not isinstance(first, str)
    registry.end_pull(first)
    assert drain(registry) == []
    second = registry.begin_pull(pull("t1", [2]))
    assert not isinstance(second, str)
    registry.end_pull(second)
    assert drain(registry) == ["req-1"]
