"""The OpenAI endpoint of a pdserve cluster, driven by the official client (issue 4)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys
import urllib.request

import openai
import pytest

from pdserve import bundled_model
from tests.integration.helpers import MODEL, PlainVLLM, ServeCluster, http_json, prompt_token_ids

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
    "What is 12 times 12?",
]


def chat_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def client(cluster: ServeCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def plain(reference: PlainVLLM) -> openai.OpenAI:
    return openai.OpenAI(base_url=reference.url + "/v1", api_key="unused", max_retries=0)


def test_chat_matches_plain_vllm(client: openai.OpenAI, plain: openai.OpenAI) -> None:
    for question in QUESTIONS[:2]:
        kwargs = dict(model=MODEL, messages=chat_messages(question), temperature=0, max_tokens=24)
        got = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
        want = plain.chat.completions.create(**kwargs)  # type: ignore[call-overload]
        assert got.choices[0].message.content == want.choices[0].message.content
        assert got.choices[0].finish_reason == want.choices[0].finish_reason
        assert got.usage.prompt_tokens == want.usage.prompt_tokens
        assert got.usage.completion_tokens == want.usage.completion_tokens
        assert got.model == MODEL and got.object == "chat.completion"


def test_streaming_chat_matches_plain_vllm(client: openai.OpenAI, plain: openai.OpenAI) -> None:
    kwargs = dict(
        model=MODEL,
        messages=chat_messages(QUESTIONS[0]),
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    got = list(client.chat.completions.create(**kwargs))  # type: ignore[call-overload]
    want = list(plain.chat.completions.create(**kwargs))  # type: ignore[call-overload]

    def text(chunks: list) -> str:
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert text(got) == text(want)
    assert got[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in got}) == 1, "one response id across the whole stream"
    assert got[-1].usage is not None and not got[-1].choices
    assert got[-1].usage.completion_tokens == want[-1].usage.completion_tokens


def test_completions_stream_and_not(client: openai.OpenAI, plain: openai.OpenAI) -> None:
    prompt = "The three most important inventions of the nineteenth century were"
    kwargs = dict(model=MODEL, prompt=prompt, temperature=0, max_tokens=20)
    got = client.completions.create(**kwargs)  # type: ignore[call-overload]
    want = plain.completions.create(**kwargs)  # type: ignore[call-overload]
    assert got.choices[0].text == want.choices[0].text
    streamed = client.completions.create(stream=True, **kwargs)  # type: ignore[call-overload]
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want.choices[0].text


def test_stop_seed_top_p_and_max_tokens(client: openai.OpenAI, plain: openai.OpenAI) -> None:
    kwargs = dict(
        model=MODEL,
        messages=chat_messages(QUESTIONS[2]),
        temperature=0.8,
        top_p=0.9,
        seed=1234,
        max_tokens=12,
        stop=["\n"],
    )
    got = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    want = plain.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.usage.completion_tokens <= 12
    assert "\n" not in (got.choices[0].message.content or "")


def test_sixteen_concurrent_requests_match(client: openai.OpenAI, reference: PlainVLLM) -> None:
    prompts = [prompt_token_ids(40 + 25 * i, seed=200 + i) for i in range(16)]

    def ask(prompt: list[int]) -> list[int]:
        answer = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        return list(answer.choices[0].model_extra["token_ids"])

    with cf.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, prompts))
    expected = [reference.complete(p, 12)["choices"][0]["token_ids"] for p in prompts]
    assert got == expected


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ("{not json", 400, "not valid JSON"),
        ({"model": MODEL}, 400, "prompt"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"model": MODEL, "prompt": "hi", "n": 0}, 400, "n: "),
        ({"model": MODEL, "prompt": "hi", "use_beam_search": True}, 400, "beam search"),
        ({"model": "no-such-model", "prompt": "hi"}, 404, "does not exist"),
        ({"model": MODEL, "prompt": [1] * 9000, "max_tokens": 4}, 400, "maximum context length"),
        ({"model": MODEL, "prompt": [-5]}, 400, "non-negative"),
        ({"model": MODEL, "prompt": "hi", "kv_transfer_params": {}}, 400, "reserved"),
    ],
)
def test_errors_in_openai_format(
    cluster: ServeCluster, body: object, status: int, fragment: str
) -> None:
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    request = urllib.request.Request(
        cluster.url + "/v1/completions", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        urllib.request.urlopen(request, timeout=60)
        raise AssertionError("expected an error")
    except urllib.error.HTTPError as e:
        assert e.code == status
        error = json.loads(e.read())["error"]
        assert fragment in error["message"]
        assert error["code"] == status and error["type"]


def test_models_health_metrics_admin(cluster: ServeCluster) -> None:
    status, models = http_json(cluster.url + "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [MODEL]
    status, health = http_json(cluster.url + "/health")
    assert status == 200 and health["status"] == "ok"
    rows = cluster.instances()
    assert {r["role"] for r in rows} == {"prefill", "decode"}
    for row in rows:
        assert {
            "id",
            "role",
            "url",
            "host",
            "pid",
            "healthy",
            "num_running",
            "num_waiting",
            "kv_usage",
        } <= row.keys()
    with urllib.request.urlopen(cluster.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    for name in (
        "pdserve_time_to_first_token_seconds_bucket",
        "pdserve_inter_token_latency_seconds",
        "pdserve_instance_running_requests",
        "pdserve_kv_loads_total",
        "pdserve_requests_total",
    ):
        assert name in text


def test_without_decode_instances_the_prefill_instance_serves_then_503(
    cluster: ServeCluster, reference: PlainVLLM
) -> None:
    """Roles are preferences: with both decode instances drained, the prefill instance
    serves requests whole (plain vLLM's greedy text); with every instance drained, 503."""
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6}
    names = ("decode-0", "decode-1", "prefill-0")
    try:
        for name in names[:2]:
            assert http_json(f"{cluster.url}/admin/instances/{name}/drain", {})[0] == 200
        status, health = http_json(cluster.url + "/health")
        assert status == 200 and health["serving"] == "colocated-only", health
        status, answer = http_json(cluster.url + "/v1/completions", {**body, "temperature": 0})
        assert status == 200, answer
        want = reference.complete(body["prompt"], max_tokens=6)
        assert answer["choices"][0]["text"] == want["choices"][0]["text"]
        assert http_json(f"{cluster.url}/admin/instances/prefill-0/drain", {})[0] == 200
        status, answer = http_json(cluster.url + "/v1/completions", body)
        assert status == 503, answer
        assert "no healthy instance" in answer["error"]["message"]
    finally:
        for name in names:
            http_json(f"{cluster.url}/admin/instances/{name}/undrain", {})


def test_vllm_bench_serve_runs_against_the_gateway(cluster: ServeCluster, tmp_path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.cli.main",
            "bench",
            "serve",
            "--base-url",
            cluster.url,
            "--model",
            MODEL,
            "--tokenizer",
            str(bundled_model.model_dir()),
            "--dataset-name",
            "random",
            "--random-input-len",
            "64",
            "--random-output-len",
            "8",
            "--num-prompts",
            "6",
            "--request-rate",
            "inf",
            "--save-result",
            "--result-dir",
            str(tmp_path),
            "--result-filename",
            "bench.json",
            "--ready-check-timeout-sec",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "bench.json").read_text())
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["mean_ttft_ms"] > 0
