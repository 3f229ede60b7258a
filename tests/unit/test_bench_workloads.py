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


def test_sharegpt_is_the_documented_name_of_chat() -> None:
    assert WorkloadSettings().workload == "sharegpt"
    for seed in (0, 5):
        chat = build_workload(WorkloadSettings(workload="chat", num_requests=30, seed=seed))
        assert chat == build_workload(
            WorkloadSettings(workload="sharegpt", num_requests=30, seed=seed)
        )


def test_azure_conv_has_the_traces_medians_and_means() -> None:
    inputs, outputs = lengths("azure-conv", n=20_000, max_context=100_000)
    # AzureLLMInferenceTrace_conv.csv (2023): input mean 1154.7, median 1020; output mean
    # 211.1, median 129; outputs 7-1000.
    assert inputs.mean() == pytest.approx(1154.7, rel=0.03)
    assert np.median(inputs) == pytest.approx(1020, rel=0.03)
    assert outputs.mean() == pytest.approx(211.1, rel=0.03)
    assert np.median(outputs) == pytest.approx(129, rel=0.03)
    assert outputs.min() >= 7 and outputs.max() <= 1000 and inputs.min() >= 2
    # Long-prompted: a heavier prefill load than sharegpt.
    assert inputs.mean() > 4 * lengths("sharegpt", n=2000, max_context=100_000)[0].mean()
    one = build_workload(WorkloadSettings(workload="azure-conv", num_requests=20, seed=1))
    assert one == build_workload(WorkloadSettings(workload="azure-conv", num_requests=20, seed=1))
    assert one != build_workload(WorkloadSettings(workload="azure-conv", num_requests=20, seed=2))


def test_priorities_and_slo_classes_leave_the_requests_unchanged() -> None:
    plain = build_workload(WorkloadSettings(num_requests=2000, seed=4))
    mixed = build_workload(WorkloadSettings(num_requests=2000, seed=4, high_priority_fraction=0.25))
    assert [(r.prompt, r.output_len) for r in plain] == [(r.prompt, r.output_len) for r in mixed]
    assert {(r.priority, r.slo_class) for r in plain} == {(0, "standard")}
    high = [r for r in mixed if r.priority == 1]
    assert {r.slo_class for r in high} == {"interactive"}
    assert len(high) / len(mixed) == pytest.approx(0.25, abs=0.03)
    assert mixed == build_workload(
        WorkloadSettings(num_requests=2000, seed=4, high_priority_fraction=0.25)
    )


@pytest.mark.parametrize("tokenizer", [None, FakeTokenizer()])
def test_shared_prefixes_are_real_in_the_token_ids(tokenizer: FakeTokenizer | None) -> None:
    settings = WorkloadSettings(
        workload="sharegpt", num_requests=300, prefix_groups=4, prefix_len=64, max_context=512
    )
    requests = build_workload(settings, tokenizer)
    prefixes: dict[int, list[int]] = {}
    for request in requests:
        assert isinstance(request.prompt, list) and request.prefix_group is not None
        assert request.prefix_len == 64 and len(request.prompt) == request.input_len
        assert request.input_len + request.output_len <= 512
        prefix = prefixes.setdefault(request.prefix_group, request.prompt[:64])
        assert request.prompt[:64] == prefix  # the same ids: vLLM's prefix cache hits
    assert sorted(prefixes) == [0, 1, 2, 3]
    assert len({tuple(p) for p in prefixes.values()}) == 4
    assert requests == build_workload(settings, tokenizer)
    if tokenizer is not None:
        assert set(np.concatenate([r.prompt for r in requests]).tolist()) <= set(range(3, 50))
    # Where no cap binds, what follows the prefix is the request's own prompt, unchanged.
    wide = settings.model_copy(update={"max_context": 100_000})
    plain = build_workload(wide.model_copy(update={"prefix_groups": 0}), tokenizer)
    for request, alone in zip(build_workload(wide, tokenizer), plain, strict=True):
        assert request.prompt[64:] == alone.prompt and request.input_len == 64 + alone.input_len


def long_exchange() -> dict[str, Any]:
    return conversation(("human", " ".join(["word"] * 20)), ("gpt", " ".join(["reply"] * 20)))


def test_shared_prefixes_on_a_sharegpt_file(tmp_path: Path) -> None:
    data = [conversation(("human", "a b c d e"), ("gpt", "f g h i")), long_exchange()]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    settings = WorkloadSettings(workload=str(path), num_requests=4, prefix_groups=2, prefix_len=8)
    requests = build_workload(settings, FakeTokenizer())
    assert {r.input_len for r in requests} == {8 + 5, 8 + 20}
    assert {r.prefix_len for r in requests} == {8}
    first = {r.prefix_group: r.prompt[:8] for r in reversed(requests)}
    assert all(r.prompt[:8] == first[r.prefix_group] for r in requests)
    with pytest.raises(ValueError, match="token-id prompts"):
        build_workload(settings)  # text prompts without a tokenizer


def test_prefix_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="prefix-len"):
        WorkloadSettings(prefix_groups=2)
    with pytest.raises(ValueError, match="room"):
        WorkloadSettings(prefix_groups=2, prefix_len=2047, max_context=2048)


def test_features_that_are_off_are_not_recorded() -> None:
    off = WorkloadSettings().model_dump(mode="json")
    assert not {"high_priority_fraction", "prefix_groups", "prefix_len"} & set(off)
    on = WorkloadSettings(high_priority_fraction=0.5, prefix_groups=2, prefix_len=8)
    assert WorkloadSettings.model_validate(on.model_dump(mode="json")) == on
