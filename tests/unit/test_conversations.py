"""The conversations workload: its prompts, its schedule, and the client that sends it turn by
turn on the answers the server actually gave."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmark.client import Runner, Target
from benchmark.run import RunSettings, run
from pdserve.workload.arrivals import ClosedLoop, OpenLoop
from pdserve.workload.conversations import conversation_schedule, word_token_ids
from pdserve.workload.workloads import (
    BenchRequest,
    WorkloadSettings,
    build_workload,
    schedule_for,
    split_warmup,
    units,
)
from tests.unit.compare_fakes import FIRST_ANSWER_ID, serve_in_thread


class WordsTokenizer:
    """Ids 0-2 special, 3-9 punctuation (no word tokens), 10-59 the words ' w10' ... ' w59'."""

    all_special_ids = [0, 1, 2]

    def __len__(self) -> int:
        return 60

    def decode(self, ids: list[int]) -> str:
        return "".join(f" w{chr(ord('a') + i // 10)}{chr(ord('a') + i % 10)}" if i >= 10 else "."
                       for i in ids)  # fmt: skip

    def encode(self, text: str) -> list[int]:
        out = []
        for word in text.split():
            if len(word) == 3 and word[0] == "w":
                out.append((ord(word[1]) - ord("a")) * 10 + ord(word[2]) - ord("a"))
            else:
                out.append(3)
        return out


def conversations(**extra: Any) -> WorkloadSettings:
    base: dict[str, Any] = {
        "workload": "conversations",
        "num_requests": 10,
        "turns": 4,
        "prefix_groups": 2,
        "prefix_len": 16,
        "input_len": 5,
        "output_len": 3,
        "think_time_s": 0.5,
        "max_context": 64,
        "warm_tenants": False,
    }
    return WorkloadSettings(**(base | extra))


def test_each_turn_resends_the_previous_turn_and_its_answer() -> None:
    settings = conversations()
    requests = build_workload(settings)
    assert len(requests) == 10 and [r.conversation for r in requests] == [0] * 4 + [1] * 4 + [2] * 2
    assert [r.turn for r in requests] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    systems: dict[int, list[int]] = {}
    for previous, request in itertools.pairwise(requests):
        assert isinstance(request.prompt, list) and len(request.prompt) == request.input_len
        assert request.prefix_len == 16 and request.output_len == 3
        assert request.prefix_group is not None
        system = systems.setdefault(request.prefix_group, request.prompt[:16])
        assert request.prompt[:16] == system
        assert request.user == request.prompt[-5:]
        if request.turn:
            assert request.conversation == previous.conversation and request.think_s > 0
            # The previous prompt, its 3-token answer, then this turn's user message.
            assert request.prompt[: previous.input_len] == previous.prompt
            assert request.input_len == previous.input_len + 3 + 5
        else:
            assert request.think_s == 0 and request.input_len == 16 + 5
    assert requests == build_workload(settings)
    assert requests != build_workload(settings.model_copy(update={"seed": 1}))


def test_each_tenant_is_warmed_up_once_before_the_point() -> None:
    warm, requests = split_warmup(build_workload(conversations(warm_tenants=True)))
    assert requests == build_workload(conversations())
    assert [r.prefix_group for r in warm] == sorted({r.prefix_group for r in requests})
    for request in warm:
        assert request.warmup and request.output_len == 1 and request.conversation is None
        first = next(r for r in requests if r.prefix_group == request.prefix_group)
        assert isinstance(first.prompt, list) and request.prompt == first.prompt[:16]


def test_conversation_settings_are_checked_and_recorded_only_when_used() -> None:
    with pytest.raises(ValueError, match="exceeds --max-context"):
        conversations(max_context=16 + 4 * 8 - 1)
    assert not {"turns", "think_time_s", "conversation_prompts"} & set(
        WorkloadSettings().model_dump(mode="json")
    )
    on = conversations()
    assert on.model_dump(mode="json")["turns"] == 4
    assert WorkloadSettings.model_validate(on.model_dump(mode="json")) == on
    no_tenants = build_workload(conversations(prefix_groups=0, prefix_len=0))
    assert all(r.prefix_group is None and r.prefix_len == 0 for r in no_tenants)
    assert no_tenants[0].input_len == 5


def test_word_tokens_round_trip_and_text_prompts() -> None:
    tokenizer = WordsTokenizer()
    assert word_token_ids(tokenizer).tolist() == list(range(10, 60))
    ids = build_workload(conversations(), tokenizer)
    text = build_workload(conversations(conversation_prompts="text"), tokenizer)
    for as_ids, as_text in zip(ids, text, strict=True):
        assert isinstance(as_text.prompt, str) and as_text.input_len == as_ids.input_len
        assert tokenizer.encode(as_text.prompt) == as_ids.prompt
        assert isinstance(as_ids.user, list) and as_text.user == tokenizer.decode(as_ids.user)
    with pytest.raises(ValueError, match="needs --tokenizer"):
        build_workload(conversations(conversation_prompts="text"))


def test_conversations_start_at_rate_over_turns() -> None:
    requests = build_workload(conversations(num_requests=4000, think_time_s=0))
    schedule = schedule_for(requests, "poisson", 8.0, seed=3)
    assert isinstance(schedule, OpenLoop) and len(schedule.times) == 1000
    # 8 requests per second in the long run: 2 conversations of 4 turns.
    assert len(schedule.times) / schedule.times[-1] == pytest.approx(2.0, rel=0.1)
    assert conversation_schedule("closed", 3, 1000, 4) == ClosedLoop(3)
    assert units(requests[:6]) == [[0, 1, 2, 3], [4, 5]]
    plain = build_workload(WorkloadSettings(num_requests=3))
    assert units(plain) == [[0], [1], [2]]
    assert len(np.asarray(schedule_for(plain, "poisson", 1.0).times)) == 3  # type: ignore[union-attr]


def test_the_client_builds_each_turn_on_the_answer_it_got(tmp_path: Path) -> None:
    with serve_in_thread() as fake:
        settings = RunSettings(
            url=fake.url,
            **conversations(num_requests=6, think_time_s=0.05, warm_tenants=True).model_dump(),
            rate=[100.0],
            output_dir=str(tmp_path),
            progress=False,
            plots=False,
            time_limit_s=30,
        )
        result = run(settings)
    warm, sent = fake.payloads[:2], fake.payloads[2:]  # two tenants warmed up first
    assert [p["max_tokens"] for p in warm] == [1, 1] and all(
        "return_token_ids" not in p for p in warm
    )
    assert len(sent) == 6 and all(p["return_token_ids"] for p in sent)
    answer = [FIRST_ANSWER_ID + i for i in range(3)]  # what the fake answers
    expected: list[list[int]] = []
    for request in split_warmup(build_workload(settings))[1]:
        assert isinstance(request.prompt, list) and isinstance(request.user, list)
        # The sampled answers replaced by the fake's; the user messages kept.
        expected.append([*expected[-1], *answer, *request.user] if request.turn else request.prompt)
    assert sorted(p["prompt"] for p in sent) == sorted(expected)
    (point,) = result["points"]
    assert point["summary"]["completed"] == 6 and point["summary"]["requests_sent"] == 6
    # The fake counts every prompt token queried and half of them cached (the warm-up's
    # are counted before the point starts).
    assert point["cache"]["hit_rate"] == pytest.approx(0.5, abs=0.01)
    assert point["cache"]["kv_transfer_bytes"] is None  # not a gateway


def test_a_failed_turn_ends_its_conversation() -> None:
    requests = [
        BenchRequest([101, 102], 2, 3, conversation=0, user=[102]),
        BenchRequest([101, 102, 7, 8, 9, 103], 6, 3, conversation=0, turn=1, user=[103]),
    ]
    target = Target("http://127.0.0.1:9/v1/completions", {}, "m", 0.0, True, 5.0)
    runner = Runner(target, requests, progress=False)
    outcome = asyncio.run(runner.run(OpenLoop((0.0,)), 10.0))
    first, second = outcome.records
    assert not first.success and "not sent: turn 0" in second.error
