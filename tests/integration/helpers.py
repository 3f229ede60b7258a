"""Running real vLLM instances and pdserve clusters in tests, and looking inside them."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from pdserve import bundled_model
from pdserve.cluster.processes import ManagedProcess, free_port, http_ok, pdserve_argv, wait_until
from pdserve.kv.messages import Ack, Failed, InjectFault, KVMessage
from pdserve.protocol.wire import SECRET_ENV, Codec

MODEL = bundled_model.MODEL_NAME
START_TIMEOUT_S = 600.0


def http_json(
    url: str, body: Any | None = None, headers: dict[str, str] | None = None, timeout: float = 120
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def vllm_metric(base_url: str, name: str) -> float:
    """One unlabelled-engine gauge from an instance's /metrics (e.g. vllm:kv_cache_usage_perc)."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = re.compile(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.eE+-]+)$", re.M)
    values = [float(v) for v in pattern.findall(text)]
    if not values:
        raise AssertionError(f"{name} not found in {base_url}/metrics")
    return sum(values)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@dataclass
class PlainVLLM:
    """A single vLLM instance with no pdserve code at all: the reference for outputs."""

    url: str
    process: ManagedProcess

    @classmethod
    def start(cls, log_dir: Path, cores: str = "1") -> PlainVLLM:
        port = free_port()
        model = bundled_model.prepare()
        env = dict(
            os.environ,
            VLLM_TARGET_DEVICE="cpu",
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_CPU_OMP_THREADS_BIND=cores,
        )
        argv = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--served-model-name",
            MODEL,
            "--dtype",
            "float32",
            "--enforce-eager",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        process = ManagedProcess("plain-vllm", argv, log_dir / "plain-vllm.log", env=env)
        return cls(f"http://127.0.0.1:{port}", process)

    def wait(self) -> None:
        wait_until(
            lambda: http_ok(self.url + "/health"), START_TIMEOUT_S, "plain vLLM", [self.process]
        )

    def complete(self, prompt: Any, max_tokens: int = 16, **extra: Any) -> dict[str, Any]:
        body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "return_token_ids": True,
            **extra,
        }
        status, answer = http_json(self.url + "/v1/completions", body)
        assert status == 200, answer
        return answer


@dataclass
class ServeCluster:
    """``pdserve serve`` run as a user would, with a known secret for KV control messages."""

    url: str
    control_port: int
    process: ManagedProcess
    secret: str
    log_dir: Path
    expected: int
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(
        cls, log_dir: Path, *args: str, expected: int, env: dict[str, str] | None = None
    ) -> ServeCluster:
        port, control_port = free_port(), free_port()
        secret = "test-secret-" + os.urandom(8).hex()
        full_env = dict(os.environ, **(env or {}))
        full_env[SECRET_ENV] = secret
        argv = pdserve_argv(
            "serve",
            "--port",
            str(port),
            "--control-port",
            str(control_port),
            "--log-dir",
            str(log_dir),
            *args,
        )
        process = ManagedProcess("pdserve-serve", argv, log_dir / "serve.log", env=full_env)
        return cls(
            f"http://127.0.0.1:{port}", control_port, process, secret, log_dir, expected, full_env
        )

    def instances(self) -> list[dict[str, Any]]:
        status, rows = http_json(self.url + "/admin/instances", timeout=5)
        return rows if status == 200 else []

    def wait(self) -> None:
        def ready() -> bool:
            try:
                rows = self.instances()
            except OSError:
                return False
            return sum(1 for r in rows if r["healthy"]) >= self.expected

        wait_until(ready, START_TIMEOUT_S, "the cluster", [self.process])

    def instance(self, instance_id: str) -> dict[str, Any]:
        for row in self.instances():
            if row["id"] == instance_id:
                return row
        raise KeyError(instance_id)

    def used_kv(self, instance_id: str) -> float:
        """vLLM's own KV usage of an instance (prefix-cached free blocks count as free)."""
        return vllm_metric(self.instance(instance_id)["url"], "vllm:kv_cache_usage_perc")

    def all_kv_free(self) -> bool:
        return all(
            vllm_metric(r["url"], "vllm:kv_cache_usage_perc") == 0.0
            for r in self.instances()
            if r["healthy"]
        )

    def placed(self) -> dict[str, str]:
        """The gateway's requests in flight: request key -> the instance serving it."""
        status, rows = http_json(self.url + "/admin/requests", timeout=10)
        assert status == 200, rows
        return {row["request_key"]: row["instance"] for row in rows}

    def kv_bytes_received(self) -> dict[str, int]:
        """KV bytes each instance has pulled so far, from a load report newer than the call."""
        time.sleep(1.0)  # a report interval (0.1 s) and then some
        return {row["id"]: row["kv_bytes_received"] for row in self.instances()}

    def idle(self) -> bool:
        """No request in the gateway's sessions (``/admin/requests`` is empty)."""
        status, rows = http_json(self.url + "/admin/requests", timeout=10)
        return status == 200 and not rows

    def leaks(self, pairs: bool = True) -> list[str]:
        """What the healthy instances still hold although nothing runs: the leak invariant.

        From their load reports (``/admin/instances``, at most a report interval old): used KV
        blocks, exports waiting for a pull or pinned, pulls in flight, and process-group pairs
        beyond two per live peer worker (one each way).
        """
        rows = [r for r in self.instances() if r["healthy"]]
        peers = len(rows) - 1
        problems = []
        for row in rows:
            used = (row["total_blocks"] or 0) - (row["free_blocks"] or 0)
            if used:
                problems.append(f"{row['id']}: {used} used KV blocks")
            for counter in ("held_exports", "inflight_pulls"):
                if row[counter]:
                    problems.append(f"{row['id']}: {counter} = {row[counter]}")
            # A pair is one-way (formed by the puller): at most two per peer worker.
            if pairs and row["open_pairs"] > 2 * peers:
                problems.append(f"{row['id']}: {row['open_pairs']} pairs for {peers} peers")
        return problems

    def assert_no_leaks(self, within_s: float = 5.0, pairs: bool = True) -> None:
        """The invariant holds within ``within_s`` (seconds, not a lease) after the last request.

        ``pairs=False`` leaves out the pair count. After a kill it is kept: survivors drop
        their pairs with a peer that answers no probe within about 4 s (docs/kv-transfer.md).
        """
        wait_for(self.idle, 120, "every request to end")
        deadline = time.monotonic() + within_s
        while True:
            problems = self.leaks(pairs)
            if not problems:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"leaks {within_s} s after the requests ended: {problems}")
            time.sleep(0.1)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def kv_address(self, instance_id: str) -> str:
        return str(self.instance(instance_id)["kv_addresses"][0])

    def inject_pull_delay(self, instance_id: str, delay_s: float, count: int = 1) -> None:
        codec: Codec[Any] = Codec(KVMessage, self.secret.encode())
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.kv_address(instance_id))
        try:
            sock.send_multipart(codec.encode(InjectFault(rid=1, delay_s=delay_s, count=count)))
            assert sock.poll(5000), "no answer to InjectFault"
            reply = codec.decode(sock.recv_multipart())
            assert isinstance(reply, Ack), reply
            assert not isinstance(reply, Failed)
        finally:
            sock.close()


def prompt_token_ids(length: int, seed: int = 0) -> list[int]:
    """A natural-language prompt of exactly ``length`` tokens of the bundled model."""
    from transformers import AutoTokenizer

    tokenizer = _tokenizer(AutoTokenizer)
    words = TEXT.split()
    start = (seed * 37) % len(words)
    text = " ".join(words[start:] + words[:start])
    ids = tokenizer(text)["input_ids"]
    while len(ids) < length:
        ids = ids + ids
    return list(ids[:length])


_TOKENIZER: Any = None


def _tokenizer(auto: Any) -> Any:
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = auto.from_pretrained(str(bundled_model.model_dir()))
    return _TOKENIZER


TEXT = """
The history of the city begins with a small settlement on the river bank, where fishermen
traded with merchants who came down from the hills. Over the centuries the town grew around
its market square, and stone bridges replaced the wooden crossings. In the eighteenth century
a university was founded, attracting scholars from distant countries, and the printing houses
along the main street produced books in many languages. Engineers later built canals, railways
and a harbour that connected the region to the sea. Today visitors walk through narrow lanes
lined with bakeries, bookshops and workshops, and the old observatory on the hill offers a view
of the whole valley, from the vineyards in the south to the forests in the north. Every spring
the city holds a festival of music and science, when laboratories open their doors and
orchestras play in the courtyards of the old colleges. Students explain experiments about light,
magnetism and the chemistry of bread, while children build small boats to race on the canal.
"""


class Stream:
    """A streaming completion read on a thread, so the test can act while it runs."""

    def __init__(self, url: str, prompt: list[int], max_tokens: int, priority: int = 0) -> None:
        body: dict[str, Any] = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "return_token_ids": True,
        }
        if priority:
            body["priority"] = priority  # vLLM's: lower is more important
        self.request = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        self.tokens: list[int] = []
        self.times: list[float] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.done = threading.Event()
        self.response: Any = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            self.response = urllib.request.urlopen(self.request, timeout=600)
            for raw in self.response:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    self.error = str(event["error"])
                for choice in event.get("choices", []):
                    if choice.get("token_ids"):
                        self.tokens.extend(choice["token_ids"])
                        self.times.append(time.perf_counter())
                    if choice.get("finish_reason"):
                        self.finish_reason = choice["finish_reason"]
        except Exception as e:  # surfaced by the test's assertions
            self.error = self.error or f"{type(e).__name__}: {e}"
        finally:
            self.done.set()

    def close(self) -> None:
        if self.response is not None:
            self.response.close()

    def wait(self, timeout: float = 600) -> None:
        assert self.done.wait(timeout), "the stream did not end"


def open_raw_stream(url: str, body: dict[str, Any]) -> socket.socket:
    """Sends a streaming request over a raw socket, so the test can vanish at will."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock
