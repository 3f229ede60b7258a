"""Stop vLLM's shared-memory queues from spinning for a second after every read.

A reader of vLLM's ``MessageQueue`` (the EngineCore waiting for its workers' results, each
worker waiting for the next step) busy-loops with ``sched_yield`` for ``busy_loop_s`` = 1 s
after every read before it sleeps on a socket; there is no setting for it. On a GPU host that
trades a spare core for latency. On a CPU host, where the workers *are* the compute and several
instances share a few cores, the spinning EngineCore was measured taking 25-50 % of a core
from the workers of its own and other instances.

This patch replaces the default with ``$PDSERVE_MQ_BUSY_LOOP_S`` (default 0: sleep at once;
a notification wakes the reader within tens of microseconds, negligible next to a CPU step
of tens of milliseconds).

A sleeping reader depends on that notification, and vLLM sends it over a PUB socket with a
high-water mark of 1, which drops a notification now and then; the reader then sleeps until
its recheck interval, ``SHM_READER_RECHECK_INTERVAL_MS`` = 5000 ms (measured: 5 s stalls
in token streams every 10-20 s). vLLM's own spinning hides this; without it the recheck
interval becomes ``$PDSERVE_MQ_RECHECK_MS`` (default 10 ms), so a lost notification costs at
most that, and an idle reader wakes 100 times a second (no measurable CPU).
"""

from __future__ import annotations

import functools
import os
from typing import Any

TARGET = "vllm.distributed.device_communicators.shm_broadcast.SpinCondition.__init__"
PINNED_SOURCE = "8f3a9f9bd27320b9"
ENV = "PDSERVE_MQ_BUSY_LOOP_S"
# Where vLLM reads the recheck interval (a module global, looked up at every wait).
RECHECK_READER = "MessageQueue.ReadTimeoutWithWarnings.timeout_ms"
PINNED_RECHECK_SOURCE = "ba1c5ba4d8638dd6"
RECHECK_ENV = "PDSERVE_MQ_RECHECK_MS"


def busy_loop_s() -> float:
    return float(os.environ.get(ENV, "0"))


def recheck_ms() -> int:
    return int(os.environ.get(RECHECK_ENV, "10"))


def apply() -> bool:
    from vllm.distributed.device_communicators import shm_broadcast

    cls = shm_broadcast.SpinCondition
    if getattr(cls.__init__, "_pdserve_patched", False):
        return False
    shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS = recheck_ms()
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) < 4 and "busy_loop_s" not in kwargs:
            kwargs["busy_loop_s"] = busy_loop_s()
        original(self, *args, **kwargs)

    __init__._pdserve_patched = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]
    return True
