"""Workloads: length distributions, caps, reproducibility, ShareGPT parsing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pdserve.workload.workloads import WorkloadSettings, build_workload, cap_lengths


class FakeTokenizer:
    """One token per whitespace-separated word; ids 0-2 are special."""

    all_special_ids = [0, 1, 2]

    def __len__(self) -> int:
        return 50

    def encode(self, text: str) -> list[int]:
        return [3 + len(word) % 40 for word in text.split()]


def lengths(workload: str, n: int = 2000, **extra: int) -> tuple[np.ndarray, np.ndarray]:
    requests = build_workload(WorkloadSettings(workload=workload, num_requests=n, **extra))
    assert all(len(r.prompt) == r.input_len for r in requests)
    return np.array([r.input_len for r in requests]), np.array([r.output_len for r in requests])


def test_chat_is_sharegpt_like_with_a_heavy_tail() -> None:
    inputs, outputs = lengths("chat", max_context=100_000)
    assert 200 <= inputs.mean() <= 300 and 180 <= outputs.mean() <= 260
    assert np.percentile(inputs, 99) > 4 * np.median(inputs)  # heavy right tail


def test_summarize_and_generate_ranges() -> None:
    inputs, outputs = lengths("summarize", n=300, max_context=4096)
    assert inputs.min() >= 1000 and inputs.max() <= 2000
    assert outputs.min() >= 50 and outputs.max() <= 100
    inputs, outputs = lengths("generate", n=300)
    assert inputs.min() >= 32 and inputs.max() <= 64
    assert outputs.min() >= 300 and outputs.max() <= 500


def test_fixed_and_the_context_cap() -> None:
    inputs, outputs = lengths("fixed", n=3, input_len=100, output_len=20)
    assert inputs.tolist() == [100] * 3 and outputs.tolist() == [20] * 3
    inputs, outputs = lengths("chat", n=500, max_context=512)
    assert (inputs + outputs).max() <= 512
    assert cap_lengths(5000, 100, 1024) == (1023, 1)
    assert cap_lengths(300, 900, 1024) == (300, 724)


def test_seeded_and_reproducible() -> None:
    one = build_workload(WorkloadSettings(num_requests=20, seed=7))
    assert one == build_workload(WorkloadSettings(num_requests=20, seed=7))
    assert one != build_workload(WorkloadSettings(num_requests=20, seed=8))
    ids = np.concatenate([np.asarray(r.prompt) for r in one])
    assert ids.min() >= 100 and ids.max() < 32000


def test_tokenizer_prompts_avoid_special_ids() -> None:
    settings = WorkloadSettings(workload="fixed", num_requests=50, input_len=40)
    ids = np.concatenate([np.asarray(r.prompt) for r in build_workload(settings, FakeTokenizer())])
    assert set(ids.tolist()) <= set(range(3, 50))


def conversation(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"conversations": [{"from": who, "value": text} for who, text in turns]}


def test_sharegpt_first_exchange_filtering_and_cycling(tmp_path: Path) -> None:
    data = [
        conversation(("human", "a b c d e"), ("gpt", "f g h i")),
        conversation(("gpt", "x"), ("human", "one two three four"), ("gpt", "w " * 6)),
        conversation(("human", "too short"), ("gpt", "ok yes no maybe")),
        conversation(("human", "w " * 50), ("gpt", "w " * 60)),
        conversation(("human", "alone")),
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    settings = WorkloadSettings(workload=str(path), num_requests=6, max_context=100)
    requests = build_workload(settings, FakeTokenizer())
    assert sorted({(r.input_len, r.output_len) for r in requests}) == [(4, 6), (5, 4)]
    assert len(requests) == 6 and all(isinstance(r.prompt, list) for r in requests)
    assert requests == build_workload(settings, FakeTokenizer())
    text = build_workload(settings.model_copy(update={"max_context": 1000}))
    assert all(isinstance(r.prompt, str) for r in text)


def test_unknown_workload() -> None:
    with pytest.raises(ValueError, match="not one of"):
        build_workload(WorkloadSettings(workload="nope"))
