"""Where a request's time to first token went: one ``Timeline`` per session, its phases in
``pdserve_request_phase_seconds{phase}`` and in ``/admin/requests``.

The phases follow each other, so they add up to the time to first token (arrival at the
gateway to the first token sent to the client):

- ``tokenize``: counting the prompt's tokens (``gateway.tokens``), from arrival;
- ``queue``: admission (a slot, ``--max-inflight``), the wait for decode room, dispatch,
  until the first leg is sent;
- ``prefill``: a disaggregated request's prefill leg, sent to answered; for a request served
  whole on one instance, its leg sent to its first token (the instance's own queue, prefill
  and first step, there is nothing to tell apart from outside);
- ``kv_transfer`` (disaggregated only): the prefill leg's end to the start of the decode
  instance's step that makes the first token. No instance reports when its pull of a
  request's KV ends, so this is derived: the first token's arrival less the decode
  instance's step time (its last load report's moving average). It holds the gateway's
  hand-off (milliseconds), the decode leg's HTTP round trip, the decode instance's admission
  and waiting queue and the pull itself: an upper bound of the transfer;
- ``first_decode`` (disaggregated only): that step, as the decode instance reports its steps.

Failovers before the first token are folded in: the leg that made the first token decides
whether the request counts as disaggregated (it pulled the prefill's KV) or whole.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import Histogram

from pdserve.protocol.reports import LoadReport


class Phase(enum.StrEnum):
    """A phase of the time to first token (``pdserve_request_phase_seconds{phase}``)."""

    TOKENIZE = "tokenize"
    QUEUE = "queue"
    PREFILL = "prefill"
    KV_TRANSFER = "kv_transfer"
    FIRST_DECODE = "first_decode"


@dataclass
class Timeline:
    """Marks of one request on the gateway's clock (``time.perf_counter`` seconds)."""

    arrived: float
    tokenized: float | None = None
    first_leg_at: float | None = None
    prefill_done_at: float | None = None
    # The latest leg before the first token: whether it pulled the prefill's KV, and the
    # step time its instance last reported.
    pulled: bool = False
    step_s: float | None = None
    first_token_at: float | None = None
    clock: Callable[[], float] = time.perf_counter

    @classmethod
    def starting(cls, other: Timeline | None) -> Timeline:
        """A session's own timeline, from the request's arrival and tokenization."""
        if other is None:
            return cls(time.perf_counter())
        return cls(other.arrived, other.tokenized, clock=other.clock)

    def mark_tokenized(self) -> None:
        self.tokenized = self.clock()

    def prefill_sent(self) -> None:
        if self.first_leg_at is None:
            self.first_leg_at = self.clock()

    def prefill_done(self) -> None:
        """The prefill leg answered with KV to pull."""
        self.prefill_done_at = self.clock()

    def leg_sent(self, load: LoadReport | None, pulled: bool) -> None:
        """A streamed leg starts (``pulled``: it pulls the prefill leg's KV)."""
        self.prefill_sent()
        if self.first_token_at is None:
            self.pulled = pulled and self.prefill_done_at is not None
            self.step_s = load.step_ms / 1e3 if load is not None else None

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = self.clock()

    def phases(self) -> dict[Phase, float]:
        """The phases so far (a request still waiting has only its first ones)."""
        start = self.tokenized if self.tokenized is not None else self.arrived
        out: dict[Phase, float] = {}
        if self.tokenized is not None:
            out[Phase.TOKENIZE] = self.tokenized - self.arrived
        if self.first_leg_at is None:
            return out
        out[Phase.QUEUE] = self.first_leg_at - start
        done, first = self.prefill_done_at, self.first_token_at
        if first is None:
            if done is not None:
                out[Phase.PREFILL] = done - self.first_leg_at
            return out
        if not self.pulled or done is None:
            out[Phase.PREFILL] = first - self.first_leg_at
            return out
        step = min(max(0.0, self.step_s or 0.0), first - done)
        out[Phase.PREFILL] = done - self.first_leg_at
        out[Phase.KV_TRANSFER] = first - step - done
        out[Phase.FIRST_DECODE] = step
        return out

    def as_json(self) -> dict[str, Any]:
        ttft = self.first_token_at - self.arrived if self.first_token_at is not None else None
        return {
            "ttft_s": _rounded(ttft),
            "phases_s": {phase.value: _rounded(s) for phase, s in self.phases().items()},
        }


def _rounded(seconds: float | None) -> float | None:
    return round(seconds, 6) if seconds is not None else None


def observe(histogram: Histogram, timeline: Timeline) -> None:
    """Adds a request's phases to ``pdserve_request_phase_seconds`` (at its first token)."""
    for phase, seconds in timeline.phases().items():
        histogram.labels(phase.value).observe(max(0.0, seconds))


class Traced(Protocol):
    """What ``/admin/requests`` shows of a session (``RequestSession`` has it)."""

    key: str
    instance_id: str | None
    prompt_ids: list[int] | None
    output_ids: list[int]
    finish_reason: str | None
    timeline: Timeline


def request_row(session: Traced, instance: str | None = None) -> dict[str, Any]:
    """One row of ``/admin/requests``: where the request is, its tokens, its phases."""
    return {
        "request_key": session.key,
        "instance": instance if instance is not None else session.instance_id,
        "output_tokens": len(session.output_ids),
        "prompt_tokens": len(session.prompt_ids or ()),
        "finish_reason": session.finish_reason,
        **session.timeline.as_json(),
    }


class RecentRequests:
    """The last ``size`` finished requests' rows, newest last."""

    def __init__(self, size: int) -> None:
        self._rows: deque[dict[str, Any]] = deque(maxlen=size)

    def add(self, session: Traced) -> None:
        if self._rows.maxlen:
            self._rows.append(request_row(session))

    def latest(self, count: int) -> Sequence[dict[str, Any]]:
        """Up to ``count`` rows, newest first."""
        rows = list(self._rows)[-count:] if count > 0 else []
        return rows[::-1]
