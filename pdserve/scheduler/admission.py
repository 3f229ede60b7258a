"""TTFT predictions over a snapshot, and admission by them: pure, like the policies.

The gateway's admission control (``--shed-over-slo``) asks ``TtftPredictor.admit`` whether
a request can still meet its TTFT SLO anywhere; the policies can reuse the same prediction
(``prefill_wait_s``, ``predicted_ttft_s``: ``PdPolicy`` ranks prefill instances by the
former), so that what admission refuses and where a policy places agree.

The prediction is deliberately simple:

    TTFT(instance) = (prompt tokens queued there + the request's own) / its prefill rate

where the queued tokens are those its last load report shows waiting (admitted but not
computed) plus what the gateway sent since (``Pending``), and the rate is the one the
instance measured (``LoadReport.prefill_tokens_per_s``), or a default until it has. It leaves
out decode interference, the gateway's own queue and the network: it is a lower bound of
the wait, so admission control refuses only where even the least loaded instance is
predicted late.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from pdserve.scheduler.snapshot import ClusterSnapshot, InstanceView, Ranking, RequestEstimate

# Retry-After of a refusal: the predicted lateness, within these bounds (seconds).
MIN_RETRY_AFTER_S = 1
MAX_RETRY_AFTER_S = 60


def prefill_rate(view: InstanceView, default_tokens_per_s: float) -> float:
    """Prompt tokens per second the instance prefills: measured, or the default until then."""
    rate = view.load.prefill_tokens_per_s if view.load else 0.0
    return rate if rate > 0 else default_tokens_per_s


def prefill_wait_s(view: InstanceView, default_tokens_per_s: float) -> float:
    """Seconds until the instance has prefilled what is queued on it now."""
    return view.queued_prompt_tokens() / prefill_rate(view, default_tokens_per_s)


def predicted_ttft_s(view: InstanceView, prompt_tokens: int, default_tokens_per_s: float) -> float:
    """The request's TTFT there: the queue ahead of it, then its own prompt."""
    queued = view.queued_prompt_tokens() + prompt_tokens
    return queued / prefill_rate(view, default_tokens_per_s)


class Verdict(enum.StrEnum):
    ADMIT = "admit"
    REFUSE = "refuse"  # no usable instance is predicted to meet the TTFT SLO


@dataclass(frozen=True)
class Admission:
    verdict: Verdict
    # The best instance's predicted TTFT (None: no SLO to judge by, or no usable instance).
    predicted_ttft_s: float | None = None
    # For a refusal: when to try again (the predicted lateness, rounded up, bounded).
    retry_after_s: int = 0


ADMITTED = Admission(Verdict.ADMIT)


class TtftPredictor:
    """The best predicted TTFT over every usable instance (any role: roles are preferences,
    and a decode instance prefills short prompts itself).

    The best is found by the ``any`` pool's ranking of the queue's wait (O(log n) on the
    gateway's indexed snapshot). It is the instance of least predicted TTFT whenever the
    rates are equal; with unequal rates a faster instance with a slightly longer queue can be
    missed (a refusal that instance might have met: the error is on the cautious side).
    """

    def __init__(self, default_prefill_tokens_per_s: float) -> None:
        self.default_tokens_per_s = default_prefill_tokens_per_s
        self.ranking = Ranking("any", self.wait_s)

    def wait_s(self, view: InstanceView) -> float:
        return prefill_wait_s(view, self.default_tokens_per_s)

    def best_ttft_s(self, snapshot: ClusterSnapshot, prompt_tokens: int) -> float | None:
        best = snapshot.best(self.ranking)
        if best is None:
            return None
        return predicted_ttft_s(best, prompt_tokens, self.default_tokens_per_s)

    def admit(
        self, snapshot: ClusterSnapshot, request: RequestEstimate, slo_ttft_s: float | None
    ) -> Admission:
        """Refuses when no instance is predicted to meet ``slo_ttft_s`` (the request's own
        SLO, else the cluster's: ``SloSettings.ttft_s``). Admits without an SLO, and without a
        usable instance (the request then gets the 503 that says so, not a 429)."""
        if slo_ttft_s is None:
            return ADMITTED
        ttft_s = self.best_ttft_s(snapshot, request.prompt_tokens)
        if ttft_s is None:
            return ADMITTED
        late_s = ttft_s - slo_ttft_s
        if late_s <= 0:
            return Admission(Verdict.ADMIT, ttft_s)
        retry = min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, math.ceil(late_s)))
        return Admission(Verdict.REFUSE, ttft_s, retry)
