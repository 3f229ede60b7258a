"""The step-time model of the instances, fitted online from their load reports.

The model family is the simulator's (``pdserve.sim.profile``): an engine step takes

    t = base_s + prefill_token_s x prompt tokens + attention_pair_s x prompt attention pairs
        + decode_seq_s x decoding sequences + decode_context_s x their context tokens

Each load report carries cumulative ``StepTotals`` (steps, seconds, and the sums of the four
features over those steps); the difference of two reports of an instance is one equation
``seconds = base_s x steps + ...``, exact for sums because the model is linear. ``StepFit``
keeps the normal equations of those equations, divided by their steps (per-step averages)
and weighted by steps / time^2 (relative error, as ``fit_profile`` does, so that a 40 ms
decode step counts as much as a 1 s prefill), and solves them for non-negative
coefficients by trying every subset of them (five unknowns: 31 small solves).

One fit for the cluster: the instances of one deployment serve the same model on the same
hardware (``pdserve serve`` starts them alike), so their reports pool into one model that
is right sooner. There is no forgetting: a profile does not drift while instances run.
Coefficients of features no report has shown yet (no prefill so far) are unknown and
``StepModel`` falls back as its fields say.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from pdserve.protocol.reports import StepTotals

# The fit is solved again after this many new equations: once per round of reports of a
# small cluster, so a decision reads a model at most one report interval old; solving costs
# ~0.5 ms, so a larger cluster solves no more often than 8 instances do.
REFIT_EVERY = 8
# Equations before the first fit: one per coefficient, else the fit is underdetermined.
MIN_EQUATIONS = 5
# Weight of one report in an instance's recent prefill work (``prefill_share``): about the
# last 10 reports, 1 s at the default interval, which spans one prefill of a typical prompt
# on the profiles here and forgets it soon after the instance stops taking prompts.
SHARE_WEIGHT = 0.1
_SUBSETS = [subset for size in range(1, 6) for subset in itertools.combinations(range(5), size)]


@dataclass(frozen=True)
class StepModel:
    """Seconds per unit of each feature. ``prefill_token_s`` None: no prefill measured yet
    (the reported prefill rate stands in); ``decode_seq_s`` None: no decode measured yet (a
    sequence's token is priced as a prompt token: one token through the weights)."""

    base_s: float = 0.0
    prefill_token_s: float | None = None
    attention_pair_s: float = 0.0
    decode_seq_s: float | None = None
    decode_context_s: float = 0.0

    def token_s(self, prefill_rate: float) -> float:
        """Seconds per token through the weights (``prefill_rate`` where none is fitted):
        what a decoding sequence costs before any decode was measured."""
        if self.prefill_token_s is not None and self.prefill_token_s > 0:
            return self.prefill_token_s
        return 1.0 / prefill_rate

    def prompt_s(self, tokens: float, pairs: float, prefill_rate: float) -> float:
        """Seconds of prompt work alone: ``tokens`` prompt tokens with ``pairs`` attention
        pairs. The fit may put all of it on either coefficient (a workload of one prompt
        length makes pairs a fixed multiple of tokens), so the two are only ever summed;
        the reported rate stands in only where neither carries any cost (no prefill seen)."""
        fitted = (self.prefill_token_s or 0.0) * tokens + self.attention_pair_s * pairs
        if fitted > 0 or tokens <= 0:
            return fitted
        return tokens / prefill_rate

    def decode_step_s(self, seqs: int, context: int, prefill_rate: float) -> float:
        """One decode-only step of ``seqs`` sequences attending over ``context`` tokens."""
        if seqs <= 0:
            return 0.0
        per_seq = self.decode_seq_s if self.decode_seq_s is not None else self.token_s(prefill_rate)
        return self.base_s + per_seq * seqs + self.decode_context_s * context

    def prefill_s(
        self,
        tokens: int,
        pairs: float,
        chunk: int,
        riders: tuple[int, int],
        prefill_rate: float,
    ) -> float:
        """``tokens`` prompt tokens (``pairs`` attention pairs) in steps of ``chunk`` tokens,
        each step also decoding ``riders`` = (sequences, context tokens): the interference
        of the instance's running decodes on its prefill."""
        if tokens <= 0:
            return 0.0
        steps = math.ceil(tokens / chunk) if chunk > 0 else 1
        seqs, context = riders
        ride = self.decode_step_s(seqs, context, prefill_rate) if seqs else self.base_s
        return self.prompt_s(tokens, pairs, prefill_rate) + steps * ride


class StepFit:
    """The online fit (see the module docstring). ``observe`` every view a decision sees;
    ``model`` is the latest solution."""

    def __init__(self) -> None:
        self._last: dict[str, StepTotals] = {}
        # Per instance, the recent (prompt tokens, attention pairs, busy seconds) per report.
        self._recent: dict[str, tuple[float, float, float]] = {}
        self._a = np.zeros((5, 5))
        self._b = np.zeros(5)
        self._seen = np.zeros(5, dtype=bool)  # features some equation had non-zero
        self._equations = 0
        self._new = 0
        self._model = StepModel()

    @property
    def equations(self) -> int:
        return self._equations

    def observe(self, instance_id: str, totals: StepTotals) -> None:
        """Adds the steps since this instance's previous totals (a restart, whose totals
        start again from 0, only sets the new baseline)."""
        last = self._last.get(instance_id)
        if last is totals:
            return
        self._last[instance_id] = totals
        if last is None or totals.steps <= last.steps or totals.seconds <= last.seconds:
            return
        steps = totals.steps - last.steps
        self._remember(instance_id, totals, last)
        row = np.array(
            [
                1.0,
                (totals.prefill_tokens - last.prefill_tokens) / steps,
                (totals.prefill_pairs - last.prefill_pairs) / steps,
                (totals.decode_seqs - last.decode_seqs) / steps,
                (totals.decode_context - last.decode_context) / steps,
            ]
        )
        y = (totals.seconds - last.seconds) / steps
        weight = steps / (y * y)
        self._a += weight * np.outer(row, row)
        self._b += weight * y * row
        self._seen |= row > 0
        self._equations += 1
        self._new += 1

    def _remember(self, instance_id: str, totals: StepTotals, last: StepTotals) -> None:
        tokens, pairs, seconds = self._recent.get(instance_id, (0.0, 0.0, 0.0))
        w = SHARE_WEIGHT
        self._recent[instance_id] = (
            tokens + w * (totals.prefill_tokens - last.prefill_tokens - tokens),
            pairs + w * (totals.prefill_pairs - last.prefill_pairs - pairs),
            seconds + w * (totals.seconds - last.seconds - seconds),
        )

    def prefill_share(self, instance_id: str, prefill_rate: float) -> float:
        """The recent fraction of the instance's busy time spent on prompt tokens: its
        decodes get a step only in the rest, so their TPOT is the decode step over
        (1 - share). At most 0.9: a share near 1 says the instance only prefills, where
        the division would say nothing meaningful."""
        tokens, pairs, seconds = self._recent.get(instance_id, (0.0, 0.0, 0.0))
        if seconds <= 0:
            return 0.0
        model = self.model()
        spent = model.prompt_s(tokens, pairs, prefill_rate)
        return min(0.9, spent / seconds)

    def model(self) -> StepModel:
        if self._equations >= MIN_EQUATIONS and self._new >= REFIT_EVERY:
            self._new = 0
            self._model = self._solve()
        return self._model

    def _solve(self) -> StepModel:
        """The non-negative least-squares solution: the best of the subsets' solutions."""
        scale = np.sqrt(np.maximum(np.diag(self._a), 1e-300))
        a = self._a / np.outer(scale, scale)
        b = self._b / scale
        best, best_x = math.inf, np.zeros(5)
        for subset in _SUBSETS:
            idx = list(subset)
            try:
                x = np.linalg.solve(a[np.ix_(idx, idx)], b[idx])
            except np.linalg.LinAlgError:
                continue
            if np.any(x < 0):
                continue
            residual = -float(x @ b[idx])  # + const: the minimum of x'Ax - 2x'b is -x'b
            if residual < best:
                best, best_x = residual, np.zeros(5)
                best_x[idx] = x
        c = best_x / scale
        seen = self._seen
        return StepModel(
            base_s=float(c[0]),
            prefill_token_s=float(c[1]) if seen[1] else None,
            attention_pair_s=float(c[2]),
            decode_seq_s=float(c[3]) if seen[3] else None,
            decode_context_s=float(c[4]),
        )
