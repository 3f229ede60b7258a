"""Step-time profiles: how long one engine step takes, as a function of what it computes.

vLLM v1 runs one forward pass per engine step over every scheduled token: prompt chunks
(prefill) and one token per running sequence (decode). Its time is modelled as linear in five
features of the step (the model Llumnix and Dynamo's mocker use, with the prefill's attention
written as the pairs of tokens it attends over, so that chunked prefill of a long prompt costs
what it costs)::

    t = base_s
        + prefill_token_s     * prefill_tokens        # new prompt tokens computed
        + attention_pair_s    * prefill_attention     # chunk x (context before + chunk / 2)
        + decode_seq_s        * decode_seqs           # sequences producing one token
        + decode_context_s    * decode_context_tokens # tokens those sequences attend over

A profile also carries what bounds an instance (KV blocks, batch limits) and moves KV (bytes
per token, link bandwidth and latency). Profiles are JSON; ``source`` says whether one was
measured (``pdserve profile``, ``pdserve.sim.measure``) or derived from published hardware
figures (``pdserve.sim.roofline``). ``request_overhead_s`` is what a request costs outside the
engine's steps (HTTP, input and output processing), once per request.

``fit_profile`` fits the coefficients to measured samples: non-negative least squares on the
relative error (each sample's equation divided by its measured time, so a 5 ms decode step
weighs as much as a 2 s prefill), with ``scipy.optimize.nnls`` where scipy is installed and
otherwise an exact solver for these few unknowns (the least-squares solution on every subset
of the coefficients, the best non-negative one kept). The fit's relative errors are stored in
the profile (``fit``).

``load_profile`` takes a path or the name of a profile in ``pdserve/sim/profiles/``: the
derived built-ins and the measured profiles committed there.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
COEFFICIENTS = ("base_s", "prefill_token_s", "attention_pair_s", "decode_seq_s", "decode_context_s")


class StepCoefficients(BaseModel):
    """Seconds per unit of each step feature (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_s: float = Field(ge=0, description="fixed cost of a step (scheduling, launch)")
    prefill_token_s: float = Field(ge=0, description="per prompt token computed")
    attention_pair_s: float = Field(ge=0, description="per (new token, attended token) pair")
    decode_seq_s: float = Field(ge=0, description="per decoding sequence")
    decode_context_s: float = Field(ge=0, description="per context token a decode attends over")


class SampleFit(BaseModel):
    """One measurement against what the fitted profile predicts for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str
    measured_s: float
    predicted_s: float


class FitQuality(BaseModel):
    """Relative errors |predicted - measured| / measured of a fit over its own samples."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int
    median_rel_error: float
    p90_rel_error: float
    max_rel_error: float
    solver: str = Field(description="scipy.optimize.nnls, or subsets (the fallback)")
    per_sample: list[SampleFit] = Field(default_factory=list)


class StepProfile(BaseModel):
    """One serving setup (model x hardware x engine limits) as the simulator sees it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    source: Literal["measured", "derived"] = Field(
        description="measured on a real instance (pdserve profile) or derived, not measured"
    )
    description: str = ""
    model: str = ""
    hardware: str = ""
    coefficients: StepCoefficients
    block_size: int = Field(16, ge=1)
    num_blocks: int = Field(
        ge=1,
        description="KV cache blocks requests can use on one instance (vLLM's num_gpu_blocks "
        "less its null block: the total_blocks of pdserve's load reports)",
    )
    kv_bytes_per_token: int = Field(ge=1, description="KV bytes of one token, all layers")
    link_bandwidth_bytes_per_s: float = Field(gt=0, description="KV transfer bandwidth")
    link_latency_s: float = Field(0.0, ge=0, description="fixed cost of one KV transfer")
    max_num_batched_tokens: int = Field(2048, ge=1, description="token budget of a step")
    max_num_seqs: int = Field(256, ge=1, description="sequences running at once")
    max_model_len: int = Field(8192, ge=1)
    request_overhead_s: float = Field(
        0.0, ge=0, description="per request, outside the engine steps (HTTP, input, output)"
    )
    fit: FitQuality | None = Field(None, description="how well a measured profile fits")
    inputs: dict[str, float | int | str] = Field(
        default_factory=dict, description="what a derived profile was derived from"
    )

    def step_seconds(self, step: StepWork) -> float:
        c = self.coefficients
        return (
            c.base_s
            + c.prefill_token_s * step.prefill_tokens
            + c.attention_pair_s * step.prefill_attention
            + c.decode_seq_s * step.decode_seqs
            + c.decode_context_s * step.decode_context_tokens
        )

    def transfer_seconds(self, tokens: int) -> float:
        """Time to pull ``tokens`` tokens of KV from one instance to another."""
        return (
            self.link_latency_s + tokens * self.kv_bytes_per_token / self.link_bandwidth_bytes_per_s
        )


@dataclass(frozen=True)
class StepWork:
    """What one engine step computes: the features of the step-time model."""

    prefill_tokens: int = 0
    prefill_attention: float = 0.0
    decode_seqs: int = 0
    decode_context_tokens: int = 0

    @staticmethod
    def chunk_attention(chunk: int, context_before: int) -> float:
        """Attention pairs of a prompt chunk of ``chunk`` tokens after ``context_before``."""
        return chunk * (context_before + chunk / 2)


@dataclass(frozen=True)
class StepSample:
    """A measured time and the engine steps it spans.

    ``requests``: how many requests' fixed overhead the time includes (1 for the send-to-answer
    time of a request, 0 for a gap between two tokens of a stream, which is one step).
    """

    steps: tuple[StepWork, ...]
    seconds: float
    requests: int = 0
    label: str = ""

    def features(self) -> list[float]:
        """Sums over the steps, in the order of COEFFICIENTS, then the request count."""
        return [
            float(len(self.steps)),
            float(sum(s.prefill_tokens for s in self.steps)),
            float(sum(s.prefill_attention for s in self.steps)),
            float(sum(s.decode_seqs for s in self.steps)),
            float(sum(s.decode_context_tokens for s in self.steps)),
            float(self.requests),
        ]


def _as_sample(sample: StepSample | tuple[StepWork, float]) -> StepSample:
    if isinstance(sample, StepSample):
        return sample
    work, seconds = sample
    return StepSample((work,), float(seconds))


def _nnls_subsets(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min ||a x - b|| over x >= 0, exactly, for a few columns: the optimum is the unconstrained
    least-squares solution on its own support, so the best non-negative one over all supports
    is it (2^columns small solves)."""
    columns = a.shape[1]
    best, best_residual = np.zeros(columns), float(np.sum(b**2))
    for size in range(1, columns + 1):
        for support in itertools.combinations(range(columns), size):
            cols = list(support)
            x, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if np.any(x < 0):
                continue
            residual = float(np.sum((a[:, cols] @ x - b) ** 2))
            if residual < best_residual - 1e-15 * max(best_residual, 1.0):
                best = np.zeros(columns)
                best[cols] = x
                best_residual = residual
    return best


def nnls(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, str]:
    """Non-negative least squares; scipy's when it is installed. Returns (x, solver)."""
    try:
        from scipy.optimize import nnls as scipy_nnls
    except ImportError:
        return _nnls_subsets(a, b), "subsets"
    x, _ = scipy_nnls(a, b)
    return np.asarray(x), "scipy.optimize.nnls"


def fit_coefficients(
    samples: Sequence[StepSample | tuple[StepWork, float]],
) -> tuple[StepCoefficients, float, FitQuality]:
    """The coefficients and the per-request overhead that fit ``samples`` best (relative
    least squares, every coefficient >= 0), and the fit's quality."""
    data = [_as_sample(s) for s in samples]
    if not data or any(s.seconds <= 0 for s in data):
        raise ValueError("fit_profile needs samples, each with a positive time")
    times = np.array([s.seconds for s in data])
    features = np.array([s.features() for s in data])
    # Relative errors: each equation divided by its own time. Columns scaled to a unit maximum
    # (the solution scales back), so that attention pairs (~1e6) and step counts (~1) are
    # equally well conditioned.
    rows = features / times[:, None]
    scale = np.abs(rows).max(axis=0)
    scale[scale == 0] = 1.0
    x, solver = nnls(rows / scale, np.ones(len(data)))
    x = x / scale
    predicted = features @ x
    errors = np.abs(predicted - times) / times
    quality = FitQuality(
        samples=len(data),
        median_rel_error=float(np.median(errors)),
        p90_rel_error=float(np.percentile(errors, 90)),
        max_rel_error=float(errors.max()),
        solver=solver,
        per_sample=[
            SampleFit(label=s.label, measured_s=s.seconds, predicted_s=float(p))
            for s, p in zip(data, predicted, strict=True)
        ],
    )
    coefficients = StepCoefficients(**{k: float(v) for k, v in zip(COEFFICIENTS, x, strict=False)})
    return coefficients, float(x[len(COEFFICIENTS)]), quality


def fit_profile(
    samples: Sequence[StepSample | tuple[StepWork, float]], **fields: Any
) -> StepProfile:
    """A measured profile: the coefficients fitted to ``samples`` (see the module docstring),
    with ``fields`` the profile's other fields (name, num_blocks, kv_bytes_per_token,
    link_bandwidth_bytes_per_s, ...)."""
    coefficients, overhead, quality = fit_coefficients(samples)
    return StepProfile(
        **{"source": "measured", **fields},
        coefficients=coefficients,
        request_overhead_s=overhead,
        fit=quality,
    )


def builtin_profiles() -> list[str]:
    """Names of the profiles in ``pdserve/sim/profiles/``."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def load_profile(name_or_path: str | Path) -> StepProfile:
    """A profile file, or a profile of ``pdserve/sim/profiles/`` by name."""
    path = Path(name_or_path)
    if path.is_file():
        return load_profile_file(path)
    builtin = PROFILES_DIR / f"{name_or_path}.json"
    if path.name == str(name_or_path) and builtin.is_file():
        return load_profile_file(builtin)
    names = ", ".join(builtin_profiles()) or "(none)"
    raise ValueError(f"profile {str(name_or_path)!r}: no such file, and not one of {names}")


def load_profile_file(path: str | Path) -> StepProfile:
    return StepProfile.model_validate_json(Path(path).read_text())


def save_profile(profile: StepProfile, path: str | Path) -> None:
    Path(path).write_text(profile.model_dump_json(indent=2) + "\n")
