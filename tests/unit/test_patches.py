"""Each vLLM patch still matches the code it was written against, and does what it says."""

from __future__ import annotations

import importlib

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
    import zmq
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    monkeypatch.setenv("PDSERVE_MQ_BUSY_LOOP_S", "0.25")
    patches.apply(["mq_busy_loop"])
    patches.apply(["mq_busy_loop"])  # idempotent
    ctx = zmq.Context()
    readers = []
    try:
        readers.append(SpinCondition(True, ctx, "inproc://pdserve-test-notify"))
        assert readers[0].busy_loop_s == 0.25
        readers.append(SpinCondition(True, ctx, "inproc://pdserve-test-notify-2", busy_loop_s=3))
        assert readers[1].busy_loop_s == 3, "an explicit value is left alone"
    finally:
        # Close every socket before the context: libzmq aborts the process otherwise.
        for reader in readers:
            for name in ("local_notify_socket", "read_cancel_socket", "write_cancel_socket"):
                sock = getattr(reader, name, None)
                if sock is not None:
                    sock.close(linger=0)
        ctx.term()


def test_unknown_patch_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        patches.apply(["nonsense"])
