"""``pdserve bench compare`` for shared prefixes (issue 14): vllm-router's other policies as
setups, conversations through a real vllm-router on fake instances, and the report's prefix
cache table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmark import compare
from benchmark.compare import CompareResults, render_report
from benchmark.compare.report import cache_table
from benchmark.local_cluster import get_json
from benchmark.run import RunSettings
from benchmark.setups import RunningSetup, parse_setup, plan_setup
from pdserve.workload.workloads import build_workload
from tests.unit import compare_fakes
from tests.unit.compare_fakes import FIRST_ANSWER_ID
from tests.unit.test_bench_compare import launch, plan, run_comparison
from tests.unit.test_conversations import WordsTokenizer, conversations

FAKES = Path(compare_fakes.__file__)


def test_vllm_router_policies_are_setups() -> None:
    spec = parse_setup("vllm-router-cache-aware", 2)
    assert (spec.kind, spec.both, spec.policy) == ("vllm-router", 2, "cache_aware")
    assert "vllm-router (cache_aware)" in spec.describe()
    assert parse_setup("vllm-router", 2).describe().endswith("(round_robin)")
    args = plan("vllm-router-cache-aware").processes[-1].argv
    assert args[args.index("--policy") + 1] == "cache_aware"
    assert parse_setup("vllm-router-power-of-two", 2).policy == "power_of_two"
    with pytest.raises(ValueError, match="must be one of"):
        parse_setup("vllm-router-kv-aware", 2)  # needs KV event sources


def _conversation_point(url: str, tmp_path: Path, prompts: str) -> RunSettings:
    values = conversations(
        num_requests=6, think_time_s=0.01, conversation_prompts=prompts, warm_tenants=True
    )
    return RunSettings(
        url=url,
        **values.model_dump(),
        rate=[50.0],
        output_dir=str(tmp_path / "points"),
        progress=False,
        plots=False,
        time_limit_s=30,
    )


@pytest.mark.parametrize("prompts", ["tokens", "text"])
def test_conversations_through_vllm_routers_cache_aware(tmp_path: Path, prompts: str) -> None:
    """The real router passes ``return_token_ids`` on and the answers' ids (or text) back, so
    every turn re-sends the answer the instance gave; its instances count the prefix cache."""
    pytest.importorskip("vllm_router")
    from pdserve.cluster.processes import free_port

    p = plan_setup(parse_setup("vllm-router-cache-aware", 2), launch(), tmp_path, free_port)
    for proc in p.processes[:2]:
        proc.argv = [sys.executable, str(FAKES), str(proc.port)]
    running = RunningSetup(p, tmp_path)
    try:
        running.start(60)
        point = _conversation_point(running.endpoint, tmp_path, prompts)
        requests = build_workload(point, WordsTokenizer())
        result = compare.measure_point(point, 50.0, requests)
        assert result.summary.completed == 6, [r.error for r in result.records]
        counters = running.counters()
        payloads = [p for url in running.instance_urls for p in get_json(url + "/payloads")]
    finally:
        running.stop()
    sent = [p for p in payloads if p["max_tokens"] > 1]  # the two tenants' warm-ups: 1
    assert len(payloads) == 8 and len(sent) == 6 and all(p["return_token_ids"] for p in sent)
    # Half of each instance's queried tokens found (rounded down on each).
    queried, found = counters["prefix_cache_queries"], counters["prefix_cache_hits"]
    assert queried > 0 and 0 <= queried - 2 * found <= 2
    answer = [FIRST_ANSWER_ID + i for i in range(3)]
    first, second = requests[2:4]  # conversation 0: turn 0, the fake's answer, turn 1's user
    if prompts == "tokens":
        assert isinstance(second.user, list)
        expected: Any = [*first.prompt, *answer, *second.user]
    else:
        expected = f"{first.prompt} t0 t1 t2{second.user}"
    assert expected in [p["prompt"] for p in sent]


def test_the_report_has_a_prefix_cache_table_only_where_counted(tmp_path: Path) -> None:
    events: list[str] = []
    with compare_fakes.serve_in_thread() as fake:
        results = run_comparison(
            tmp_path, fake, events, setups=["vllm-router-cache-aware", "pdserve-rr"]
        )
    saved = CompareResults.model_validate(results)
    assert not cache_table(saved.setups)  # the fake Running counts preemptions only
    for entry in saved.setups:
        for point in entry.points:
            point.counters |= {
                "prefix_cache_queries": 1000.0,
                "prefix_cache_hits": 750.0,
                "kv_received_bytes": 2e6,
            }
    table = "\n".join(cache_table(saved.setups))
    assert "| vllm-router-cache-aware (rep 1) | 50 | 1000 | 750 | 75.0% | 2.0 | 500.0 |" in table
    assert "## Prefix cache and KV moved" in render_report(saved)
    assert json.loads(json.dumps(saved.to_json()))["setups"][0]["name"] == (
        "vllm-router-cache-aware"
    )


def test_a_conversations_point_warms_its_tenants_up_before_its_counters(tmp_path: Path) -> None:
    events: list[str] = []
    with compare_fakes.serve_in_thread() as fake:
        results = run_comparison(
            tmp_path, fake, events, setups=["pdserve-rr"], repetitions=1, rate=[50.0],
            workload="conversations", prefix_groups=2, prefix_len=16, turns=2,
            think_time_s=0.01, max_context=64,
        )  # fmt: skip
    assert events == [
        "start pdserve-rr", "warm pdserve-rr", "warm pdserve-rr", "point pdserve-rr 50",
        "stop pdserve-rr",
    ]  # fmt: skip
    (point,) = results["setups"][0]["points"]
    assert point["summary"]["requests_sent"] == 4  # the tenants' warm-ups are not measured
    # The setup's warm-up (other prompts: its tenant and a 2-turn conversation), then the
    # point's two tenants, then its four turns.
    point_tenants = [p for p in fake.payloads[3:] if p["max_tokens"] == 1]
    assert len(fake.payloads) == 3 + 2 + 4
    assert len(point_tenants) == 2 and all(len(p["prompt"]) == 16 for p in point_tenants)
    assert "2 tenants with 16-token system prompts" in (tmp_path / "out" / "report.md").read_text()


# The real-vLLM comparison of issue 14 (README, "Shared prefixes"): it must stay valid.
ISSUE_14_ARGS = (
    "--setups pdserve-cache-aware pdserve-rr vllm-router-cache-aware --repetitions 3 "
    "--workload conversations --conversation-prompts text --prefix-groups 6 --prefix-len 1536 "
    "--turns 4 --input-len 64 --output-len 32 --think-time-s 3 --num-requests 120 --rate 0.4 "
    "--max-context 2048 --kv-cache-gib 1 --warmup-requests 2 --time-limit-s 900 --no-progress "
    "--output-dir benchmark/results/compare-prefix-2core "
    "--num-gpu-blocks-override 56 --max-model-len 2048"
)


def test_the_issue_14_comparison_is_a_valid_command() -> None:
    parser = argparse.ArgumentParser()
    compare.add_compare_arguments(parser)
    namespace, vllm_args = parser.parse_known_args(ISSUE_14_ARGS.split())
    settings = compare.settings_from_args(namespace)
    assert vllm_args == ["--num-gpu-blocks-override", "56", "--max-model-len", "2048"]
    assert compare.warn_about(settings) == []  # 3 repetitions, >= 100 requests
    cache_aware = parse_setup("pdserve-cache-aware", 2)
    assert (cache_aware.both, cache_aware.policy) == (2, "cache-aware")
    argv = plan("pdserve-cache-aware").processes[0].argv
    assert argv[argv.index("--policy") + 1] == "cache-aware"
    # 6 tenants x 12 blocks of 128 tokens exceed one instance's 56 blocks; half of them fit,
    # with the histories of four conversations at a time (4 turns of 96 tokens).
    assert 6 * 1536 > 56 * 128 > 3 * 1536 + 4 * 4 * 96
    assert settings.conversation_shape().longest() <= settings.max_context <= 2048
    assert 45 * 60 < compare.planned_s(settings) < 60 * 60
