"""The simulated clock: one heap of timed callbacks, run in time order.

Ties run in the order they were scheduled (a sequence number breaks them), so a run is a pure
function of its inputs. Nothing is ever removed from the heap: an event that lost its
meaning (a step end after the step was shortened) is recognised and ignored by its handler,
which is cheaper than deleting from a heap.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any


class EventQueue:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = 0
        self.processed = 0

    def at(self, time: float, callback: Callable[[Any], None], arg: Any = None) -> None:
        """Runs ``callback(arg)`` at ``time`` (never before now)."""
        self._seq += 1
        heapq.heappush(self._heap, (max(time, self.now), self._seq, callback, arg))

    def clock(self) -> float:
        return self.now

    def run(
        self, until: float = float("inf"), after_each: Callable[[], None] | None = None
    ) -> None:
        """Runs events until none is left or the next one is later than ``until``;
        ``after_each`` (tests: invariants) is called after every event."""
        heap = self._heap
        pop = heapq.heappop
        while heap and heap[0][0] <= until:
            time, _, callback, arg = pop(heap)
            self.now = time
            self.processed += 1
            callback(arg)
            if after_each is not None:
                after_each()

    def __len__(self) -> int:
        return len(self._heap)
