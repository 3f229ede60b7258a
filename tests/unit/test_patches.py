"""Each vLLM patch still matches the code it was written against, and does what it says."""

from __future__ import annotations

import importlib
from unittest import mock

import pytest

from pdserve import patches


@pytest.mark.parametrize("name", patches.PATCHES)
def test_patched_code_has_not_moved(name: str) -> None:
    patch = patches.module(name)
    module_path, _, attribute = patch.TARGET.rpartition(".")
    owner_path, _, owner_name = module_path.rpartition(".")
    owner = getattr(importlib.import_module(owner_path), owner_name)
    target = getattr(owner, attribute)
    target = getattr(target, "__wrapped__", target)
    assert patches.source_digest(target) == patch.PINNED_SOURCE, (
        f"{patch.TARGET} changed in this vLLM: review patches/{name}.py and re-pin it"
    )


def test_mq_busy_loop_sets_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    monkeypatch.setenv("PDSERVE_MQ_BUSY_LOOP_S", "0.25")
    patches.apply(["mq_busy_loop"])
    patches.apply(["mq_busy_loop"])  # idempotent
    # A stand-in ZeroMQ context: real sockets torn down in a test process made libzmq abort
    # the whole run now and then; only the constructor's arguments matter here.
    context = mock.MagicMock()
    assert SpinCondition(True, context, "inproc://a").busy_loop_s == 0.25
    explicit = SpinCondition(True, context, "inproc://b", busy_loop_s=3)
    assert explicit.busy_loop_s == 3, "an explicit value is left alone"


def test_mq_recheck_interval_is_still_read_where_it_was() -> None:
    from pdserve.patches import mq_busy_loop
    from vllm.distributed.device_communicators import shm_broadcast

    reader = shm_broadcast.MessageQueue.ReadTimeoutWithWarnings.timeout_ms
    assert patches.source_digest(reader) == mq_busy_loop.PINNED_RECHECK_SOURCE, (
        "vLLM changed how readers recheck: review patches/mq_busy_loop.py and re-pin it"
    )
    assert "SHM_READER_RECHECK_INTERVAL_MS" in reader.__code__.co_names


def test_mq_busy_loop_bounds_the_recheck_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.distributed.device_communicators import shm_broadcast

    monkeypatch.setattr(shm_broadcast, "SHM_READER_RECHECK_INTERVAL_MS", 5000)
    monkeypatch.setenv("PDSERVE_MQ_RECHECK_MS", "7")
    cls = shm_broadcast.SpinCondition
    monkeypatch.setattr(cls, "__init__", getattr(cls.__init__, "__wrapped__", cls.__init__))
    patches.apply(["mq_busy_loop"])
    timeout = shm_broadcast.MessageQueue.ReadTimeoutWithWarnings(timeout=None, should_warn=False)
    assert timeout.timeout_ms() == 7


def test_unknown_patch_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        patches.apply(["nonsense"])
