"""Step-time profiles: the fit, the derived built-ins and their committed JSON, loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pdserve.sim import roofline
from pdserve.sim.profile import (
    PROFILES_DIR,
    StepCoefficients,
    StepSample,
    StepWork,
    _nnls_subsets,
    builtin_profiles,
    fit_profile,
    load_profile,
    nnls,
    save_profile,
)

TRUE = StepCoefficients(
    base_s=0.004,
    prefill_token_s=2e-5,
    attention_pair_s=5e-9,
    decode_seq_s=8e-4,
    decode_context_s=1.5e-6,
)
OVERHEAD_S = 0.003
PROFILE_FIELDS = {
    "name": "test",
    "num_blocks": 100,
    "kv_bytes_per_token": 1000,
    "link_bandwidth_bytes_per_s": 1e9,
}


def model_seconds(sample: StepSample) -> float:
    c = TRUE
    steps = sum(
        c.base_s
        + c.prefill_token_s * s.prefill_tokens
        + c.attention_pair_s * s.prefill_attention
        + c.decode_seq_s * s.decode_seqs
        + c.decode_context_s * s.decode_context_tokens
        for s in sample.steps
    )
    return steps + OVERHEAD_S * sample.requests


def synthetic_samples(noise: float = 0.0, seed: int = 0) -> list[StepSample]:
    rng = np.random.default_rng(seed)
    shapes = []
    for tokens in (16, 64, 256, 1024, 2048, 4096):
        chunks = []
        for start in range(0, tokens, 2048):
            chunk = min(2048, tokens - start)
            chunks.append(StepWork(chunk, StepWork.chunk_attention(chunk, start)))
        shapes.append(StepSample(tuple(chunks), 0.0, requests=1))
    for batch in (1, 4, 16, 32):
        for context in (64, 512, 2048):
            work = StepWork(decode_seqs=batch, decode_context_tokens=batch * context)
            shapes.append(StepSample((work,), 0.0))
    return [
        StepSample(s.steps, model_seconds(s) * (1 + noise * rng.standard_normal()), s.requests)
        for s in shapes
    ]


def assert_close(fitted: StepCoefficients, rel: float) -> None:
    for name, value in TRUE.model_dump().items():
        assert getattr(fitted, name) == pytest.approx(value, rel=rel), name


def test_the_fit_recovers_exact_coefficients() -> None:
    profile = fit_profile(synthetic_samples(), **PROFILE_FIELDS)
    assert profile.source == "measured"
    assert_close(profile.coefficients, 1e-6)
    assert profile.request_overhead_s == pytest.approx(OVERHEAD_S, rel=1e-6)
    assert profile.fit is not None and profile.fit.samples == 18
    assert profile.fit.median_rel_error < 1e-9 and profile.fit.p90_rel_error < 1e-9


def test_the_fit_with_noise_and_its_quality() -> None:
    profile = fit_profile(synthetic_samples(noise=0.02, seed=3), **PROFILE_FIELDS)
    assert_close(profile.coefficients, 0.25)
    fit = profile.fit
    assert fit is not None
    assert 0 < fit.median_rel_error <= fit.p90_rel_error <= fit.max_rel_error < 0.1
    assert len(fit.per_sample) == 18


def test_a_plain_step_pair_is_a_sample_too() -> None:
    pairs = [(StepWork(decode_seqs=b), 0.01 + 0.001 * b) for b in (1, 2, 4, 8)]
    profile = fit_profile(pairs, **PROFILE_FIELDS)
    assert profile.coefficients.base_s == pytest.approx(0.01, rel=1e-6)
    assert profile.coefficients.decode_seq_s == pytest.approx(0.001, rel=1e-6)
    with pytest.raises(ValueError, match="positive time"):
        fit_profile([(StepWork(), 0.0)], **PROFILE_FIELDS)


def test_the_solvers_never_go_negative_and_agree() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        a = rng.standard_normal((12, 4))
        b = rng.standard_normal(12)
        x_small = _nnls_subsets(a, b)
        x, _ = nnls(a, b)
        assert (x_small >= 0).all() and (x >= 0).all()
        # Both are the optimum: no worse than each other (up to rounding).
        assert np.sum((a @ x_small - b) ** 2) <= np.sum((a @ x - b) ** 2) + 1e-9
        assert np.sum((a @ x - b) ** 2) <= np.sum((a @ x_small - b) ** 2) + 1e-9
    # Unconstrained, the second coefficient would be negative.
    a = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    x = _nnls_subsets(a, np.array([3.0, 2.0, 1.0]))
    assert x[1] == 0 and x[0] == pytest.approx(2.0)


def test_the_committed_builtins_are_what_the_code_derives(tmp_path: Path) -> None:
    roofline.write_profiles(tmp_path)
    derived = sorted(p.name for p in tmp_path.glob("*.json"))
    assert derived == ["llama-2-7b-a10.json", "llama-3.1-8b-h100.json", "qwen3-32b-h20.json"]
    for name in derived:
        committed = PROFILES_DIR / name
        assert committed.is_file(), f"run python -m pdserve.sim.roofline: {name} is missing"
        assert json.loads(committed.read_text()) == json.loads((tmp_path / name).read_text()), (
            f"{name} differs from pdserve.sim.roofline: run python -m pdserve.sim.roofline"
        )


def test_derived_profiles_are_labelled_and_plausible() -> None:
    profiles = roofline.derived_profiles()
    kv = {name: p.kv_bytes_per_token for name, p in profiles.items()}
    assert kv == {
        "llama-2-7b-a10": 2 * 32 * 32 * 128 * 2,
        "qwen3-32b-h20": 2 * 64 * 8 * 128 * 2,
        "llama-3.1-8b-h100": 2 * 32 * 8 * 128 * 2,
    }
    for profile in profiles.values():
        assert profile.source == "derived" and "derived, not measured" in profile.description
        assert profile.inputs["compute_efficiency"] == roofline.COMPUTE_EFFICIENCY
        # Weights stream once per step: a decode step is at least the weight read.
        inputs = {k: v for k, v in profile.inputs.items() if isinstance(v, (int, float))}
        weights = inputs["model_params"] * 2 / inputs["gpu_hbm_bytes_per_s"]
        assert profile.coefficients.base_s > weights
        # The KV cache holds at least one longest request, and the memory adds up.
        tokens = profile.num_blocks * profile.block_size
        assert tokens >= profile.max_model_len
        used = tokens * profile.kv_bytes_per_token + inputs["model_params"] * 2
        assert used <= 0.9 * inputs["gpu_memory_bytes"]
    a10 = profiles["llama-2-7b-a10"]
    prefill = a10.step_seconds(StepWork(512, StepWork.chunk_attention(512, 0)))
    decode = a10.step_seconds(StepWork(decode_seqs=32, decode_context_tokens=32 * 1024))
    assert 0.05 < prefill < 0.3 and 0.03 < decode < 0.15
    h100 = profiles["llama-3.1-8b-h100"]
    assert h100.step_seconds(StepWork(512, StepWork.chunk_attention(512, 0))) < prefill


def test_load_profile_by_name_or_path(tmp_path: Path) -> None:
    assert {"llama-2-7b-a10", "qwen3-32b-h20", "llama-3.1-8b-h100"} <= set(builtin_profiles())
    by_name = load_profile("qwen3-32b-h20")
    assert by_name == roofline.derived_profiles()["qwen3-32b-h20"]
    path = tmp_path / "mine.json"
    save_profile(fit_profile(synthetic_samples(), **PROFILE_FIELDS), path)
    loaded = load_profile(str(path))
    assert loaded.fit is not None and loaded.name == "test"
    with pytest.raises(ValueError, match=r"not one of .*llama-2-7b-a10"):
        load_profile("no-such-profile")
