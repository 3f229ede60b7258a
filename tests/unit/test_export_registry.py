"""Exports are finished exactly once, and only when they own their blocks."""

from __future__ import annotations

import threading
import time

from pdserve.kv.messages import PullRequest
from pdserve.kv.worker_side import ExportOrder, ExportRegistry, ExportUpdate


def drain(registry: ExportRegistry) -> list[str]:
    done = []
    while not registry.finished.empty():
        done.append(registry.finished.get_nowait())
    return done


def pull(
    transfer_id: str, first: int, count: int, wait_s: float = 0.0, last: bool = True
) -> PullRequest:
    return PullRequest(
        rid=1,
        transfer_id=transfer_id,
        pair_id="p",
        seq=0,
        first=first,
        dst=list(range(100, 100 + count)),
        wait_s=wait_s,
        last=last,
    )


def test_pull_resolves_positions_and_finishes_the_export_once() -> None:
    registry = ExportRegistry()
    registry.add(ExportOrder("t1", "req-1", [30, 31, 7], lease_s=30))
    claimed = registry.begin_pull(pull("t1", 1, 2))
    assert not isinstance(claimed, str)
    export, src = claimed
    assert src == [31, 7]
    assert drain(registry) == []  # blocks stay pinned while the pull runs
    registry.end_pull(export)
    assert drain(registry) == ["req-1"]
    registry.release("t1", tombstone_s=1)  # late release: nothing more
    registry.expire()
    assert drain(registry) == []
    assert "already" in registry.begin_pull(pull("t1", 0, 1))  # type: ignore[operator]


def test_release_while_pulling_waits_for_the_pull() -> None:
    registry = ExportRegistry()
    registry.add(ExportOrder("t1", "req-1", [1], lease_s=30))
    claimed = registry.begin_pull(pull("t1", 0, 1))
    assert not isinstance(claimed, str)
    registry.release("t1", tombstone_s=1)
    assert drain(registry) == []
    registry.end_pull(claimed[0])
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


def test_pull_beyond_the_export_is_refused() -> None:
    registry = ExportRegistry()
    registry.add(ExportOrder("t1", "req-1", [1, 2], lease_s=30))
    assert isinstance(registry.begin_pull(pull("t1", 1, 2)), str)
    assert isinstance(registry.begin_pull(pull("nope", 0, 1)), str)


def test_pull_waits_for_a_registration_on_its_way() -> None:
    registry = ExportRegistry()
    timer = threading.Timer(0.05, registry.add, [ExportOrder("t1", "req-1", [1], lease_s=30)])
    timer.start()
    assert not isinstance(registry.begin_pull(pull("t1", 0, 1, wait_s=2)), str)


def test_a_live_export_is_never_reported_while_its_request_runs() -> None:
    registry = ExportRegistry()
    registry.add(ExportOrder("live", "req-1", [5, 6], lease_s=0.01, owns=False))
    first = registry.begin_pull(pull("live", 0, 2, last=False))  # a pre-copy stage
    assert not isinstance(first, str)
    registry.end_pull(first[0])
    registry.update(ExportUpdate("live", "req-1", block_ids=[5, 6, 9]))
    time.sleep(0.02)
    registry.expire()  # no lease while vLLM owns the blocks
    last = registry.begin_pull(pull("live", 2, 1))  # the pull after the cut, maybe early
    assert not isinstance(last, str) and last[1] == [9]
    registry.end_pull(last[0])
    assert drain(registry) == [], "the request may still be running: vLLM owns its blocks"
    registry.update(ExportUpdate("live", "req-1", block_ids=[5, 6, 9], owns=True))
    assert drain(registry) == ["req-1"]


def test_an_owned_live_export_gets_a_lease() -> None:
    registry = ExportRegistry()
    registry.add(ExportOrder("live", "req-1", [5], lease_s=0.01, owns=False))
    registry.update(ExportUpdate("live", "req-1", owns=True))
    time.sleep(0.02)
    registry.expire()
    assert drain(registry) == ["req-1"]


def test_void_drops_without_freeing_and_invalidates_reads() -> None:
    registry = ExportRegistry()
    registry.add(ExportOrder("live", "req-1", [5, 6], lease_s=30, owns=False))
    claimed = registry.begin_pull(pull("live", 0, 2, last=False))
    assert not isinstance(claimed, str)
    registry.update(ExportUpdate("live", "req-1", void=True))  # preempted
    assert not claimed[0].valid
    registry.end_pull(claimed[0])
    assert drain(registry) == [] and len(registry) == 0


def test_ownership_of_an_unknown_export_frees_at_once() -> None:
    registry = ExportRegistry()
    registry.update(ExportUpdate("gone", "req-1", owns=True))
    assert drain(registry) == ["req-1"]
