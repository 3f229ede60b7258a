"""Batched prompts and n > 1 split into single sequences and merged back as vLLM does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from pdserve.gateway.fanout import Sample, interleave, merge_usage, split
from pdserve.gateway.openai_api import CompletionRequest

pytestmark = pytest.mark.unit


def completion(**body: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "a", **body})


def test_a_plain_request_is_its_own_single_sample() -> None:
    request = completion()
    assert split(request) == [Sample(0, 0, 0, request)]


def test_choices_are_prompt_major_and_samples_get_seed_plus_j() -> None:
    samples = split(completion(prompt=["x", "y"], n=2, seed=10))
    assert [(s.index, s.prompt_index, s.sample) for s in samples] == [
        (0, 0, 0),
        (1, 0, 1),
        (2, 1, 0),
        (3, 1, 1),
    ]
    assert [s.request.prompt for s in samples] == ["x", "x", "y", "y"]
    assert [s.request.seed for s in samples] == [10, 11, 10, 11]
    assert all(s.request.n == 1 for s in samples)
    # The copies are what the gateway forwards: the changed fields count as set.
    assert samples[1].request.model_dump(exclude_unset=True)["seed"] == 11


def test_token_id_prompts_batch_but_one_token_list_does_not() -> None:
    assert len(split(completion(prompt=[[1, 2], [3]]))) == 2
    assert len(split(completion(prompt=[1, 2, 3]))) == 1


def test_usage_counts_each_prompt_once_and_every_output() -> None:
    samples = split(completion(prompt=["x", "y"], n=2))
    usages = [(s, {"prompt_tokens": 5 + s.prompt_index, "completion_tokens": 3}) for s in samples]
    assert merge_usage(usages) == {"prompt_tokens": 11, "completion_tokens": 12, "total_tokens": 23}


async def _items(values: list[int], delay_s: float) -> AsyncGenerator[Any, None]:
    for value in values:
        await asyncio.sleep(delay_s)
        yield value


def test_interleave_tags_items_and_closes_every_stream_on_an_error() -> None:
    closed: list[str] = []

    async def failing() -> AsyncGenerator[Any, None]:
        try:
            yield 1
            await asyncio.sleep(0.05)
            raise ValueError("upstream said no")
        finally:
            closed.append("failing")

    async def endless() -> AsyncGenerator[Any, None]:
        try:
            while True:
                await asyncio.sleep(0.01)
                yield 0
        finally:
            closed.append("endless")

    async def run() -> list[tuple[int, Any]]:
        seen = []
        with pytest.raises(ValueError, match="upstream said no"):
            async for item in interleave([failing(), endless()]):
                seen.append(item)
        return seen

    seen = asyncio.run(run())
    assert (0, 1) in seen and (1, 0) in seen
    assert sorted(closed) == ["endless", "failing"]


def test_interleave_yields_everything_of_finite_streams() -> None:
    async def run() -> list[tuple[int, Any]]:
        return [x async for x in interleave([_items([1, 2], 0.01), _items([3], 0.0)])]

    assert sorted(asyncio.run(run())) == [(0, 1), (0, 2), (1, 3)]
