"""Migration downtime: the extra pause a live migration puts into a token stream.

For each context length, one request streams on a decode instance; after ``--migrate-after``
tokens it is moved to the other decode instance by each method in turn, in the same run:

- ``live``: pdserve's migration (pre-copy of full blocks while decoding, then a short cut);
- ``blocking``: stop, copy every block, resume (no pre-copy);
- ``recompute``: stop, re-prefill prompt + output on the target (no KV moves).

Figures per (length, method): the stream's gap across the move as the client saw it, that gap
minus one ordinary decode step (the *extra* gap, i.e. downtime in Llumnix's sense), the
gateway's own measure (last token on the source to first on the target), the total
migration time, and the gap in decode steps. Llumnix reports 20–30 ms flat from 256 to 8k
tokens; the target here is ≤ 1.5 decode steps at every length.

    python -m benchmark.migration                # starts a 1P2D cluster itself
    python -m benchmark.migration --url URL      # an already running pdserve serve --decode 2
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from benchmark.client import parse_sse_line
from benchmark.local_cluster import get_json, healthy, instances, local_cluster

METHODS = ("live", "blocking", "recompute")
CLUSTER_ARGS = [
    "--prefill", "1", "--decode", "2", "--short-prompt-tokens", "0",
    "--prefill-saturation-s", "100000", "--kv-cache-gib", "1",
]  # fmt: skip


@dataclass
class Trial:
    context_tokens: int
    method: str
    status: str = "not run"
    reason: str = ""
    step_s: float | None = None  # median gap between tokens before the move
    gap_s: float | None = None  # the stream's gap across the move, client side
    gateway_downtime_s: float | None = None
    migration_s: float | None = None
    stages: int = 0
    precopied_blocks: int = 0
    tokens: list[int] = field(default_factory=list)

    @property
    def extra_s(self) -> float | None:
        if self.gap_s is None or self.step_s is None:
            return None
        return max(0.0, self.gap_s - self.step_s)

    def row(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("tokens")
        row["extra_s"] = self.extra_s
        return row


def prompt_ids(length: int, seed: int) -> list[int]:
    """Ordinary vocabulary ids (no special tokens), different per length and repeat."""
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(1000, 40000, size=length)]


def gap_across(times: Sequence[float], moved_at: float) -> float | None:
    """The longest gap between tokens that ends after the move began."""
    gaps = [b - a for a, b in itertools.pairwise(times) if b > moved_at]
    return max(gaps) if gaps else None


def step_before(times: Sequence[float], moved_at: float) -> float | None:
    gaps = [b - a for a, b in itertools.pairwise(times) if b <= moved_at]
    return statistics.median(gaps[1:]) if len(gaps) > 1 else None


async def only_request(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    for _ in range(400):
        async with http.get(url + "/admin/requests") as response:
            rows = await response.json()
        if len(rows) == 1:
            return dict(rows[0])
        await asyncio.sleep(0.05)
    raise RuntimeError("expected exactly one request in flight")


async def run_trial(
    http: aiohttp.ClientSession,
    url: str,
    model: str,
    trial: Trial,
    decoders: Sequence[str],
    migrate_after: int,
    seed: int,
    tail_spread: int = 0,
) -> None:
    # Where the cut falls in its last block varies per trial, as it does in service: a
    # context that is always a multiple of the block size would always leave a short tail.
    spread = int(np.random.default_rng(seed).integers(0, tail_spread)) if tail_spread else 0
    prompt = prompt_ids(trial.context_tokens - migrate_after - spread, seed)
    body = {
        "model": model, "prompt": prompt, "max_tokens": migrate_after + 40, "temperature": 0,
        "ignore_eos": True, "stream": True, "return_token_ids": True,
    }  # fmt: skip
    times: list[float] = []
    move: asyncio.Task[Any] | None = None
    moved_at = float("inf")
    async with http.post(url + "/v1/completions", json=body) as response:
        async for line in response.content:
            event = parse_sse_line(line)
            if event is None:
                continue
            for choice in event.get("choices", []):
                ids = choice.get("token_ids") or []
                if ids:
                    trial.tokens.extend(ids)
                    times.append(time.perf_counter())
            if move is None and len(trial.tokens) >= migrate_after:
                request = await only_request(http, url)
                target = next(d for d in decoders if d != request["instance"])
                moved_at = time.perf_counter()
                order = {"request_key": request["request_key"], "target": target}
                order["mode"] = trial.method
                move = asyncio.create_task(_post(http, url + "/admin/migrate", order))
    if move is None:
        trial.reason = "the stream ended before the move"
        return
    result = await move
    trial.status = result.get("status", "?")
    trial.reason = result.get("reason", "")
    trial.gateway_downtime_s = result.get("downtime_s")
    trial.migration_s = result.get("duration_s")
    trial.stages = int(result.get("stages", 0))
    trial.precopied_blocks = int(result.get("precopied_blocks", 0))
    trial.step_s = step_before(times, moved_at)
    trial.gap_s = gap_across(times, moved_at)


async def _post(http: aiohttp.ClientSession, url: str, body: Any) -> Any:
    async with http.post(url, json=body) as response:
        return await response.json()


async def measure(
    url: str, lengths: Sequence[int], repeats: int, migrate_after: int, tail_spread: int = 0
) -> list[Trial]:
    decoders = sorted(
        row["id"] for row in healthy(instances(url)) if row["role"] in ("decode", "both")
    )
    if len(decoders) < 2:
        raise SystemExit("the cluster needs two decode instances")
    model = get_json(url + "/v1/models")["data"][0]["id"]
    trials: list[Trial] = []
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for repeat in range(repeats):
            for length in lengths:
                for index, method in enumerate(METHODS):  # interleaved: drift hits all alike
                    trial = Trial(length, method)
                    # A new prompt per trial: the target's prefix cache must not hold it.
                    seed = (length * 10 + repeat) * len(METHODS) + index
                    await run_trial(
                        http, url, model, trial, decoders, migrate_after, seed, tail_spread
                    )
                    trials.append(trial)
                    print(_line(trial), flush=True)
    return trials


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def _line(t: Trial) -> str:
    steps = f"{t.gap_s / t.step_s:.1f}" if t.gap_s and t.step_s else "-"
    return (
        f"{t.context_tokens:>6} {t.method:<10} {t.status:<10} step {_ms(t.step_s):>5} ms  "
        f"gap {_ms(t.gap_s):>6} ms ({steps} steps)  extra {_ms(t.extra_s):>6} ms  "
        f"gateway {_ms(t.gateway_downtime_s):>6} ms  total {_ms(t.migration_s):>6} ms"
        f"{'  ' + t.reason if t.reason else ''}"
    )


def summarize(trials: Sequence[Trial]) -> list[dict[str, Any]]:
    """Medians per (length, method), with each baseline's gap as a multiple of live's."""
    rows: list[dict[str, Any]] = []
    for length in sorted({t.context_tokens for t in trials}):
        live_gap = None
        for method in METHODS:
            done = [
                t for t in trials
                if t.context_tokens == length and t.method == method and t.status == "completed"
                and t.gap_s is not None and t.step_s is not None
            ]  # fmt: skip
            if not done:
                rows.append({"context_tokens": length, "method": method, "completed": 0})
                continue
            gap = statistics.median(t.gap_s for t in done if t.gap_s is not None)
            step = statistics.median(t.step_s for t in done if t.step_s is not None)
            if method == "live":
                live_gap = gap
            rows.append({
                "context_tokens": length, "method": method, "completed": len(done),
                "step_ms": step * 1e3, "gap_ms": gap * 1e3,
                "extra_ms": max(0.0, gap - step) * 1e3, "gap_steps": gap / step,
                "migration_ms": statistics.median(t.migration_s or 0.0 for t in done) * 1e3,
                "vs_live": gap / live_gap if live_gap else None,
            })  # fmt: skip
    return rows


def print_summary(rows: Sequence[dict[str, Any]]) -> None:
    print("\ncontext  method      n  step ms  gap ms  extra ms  gap/steps  total ms  gap vs live")
    for r in rows:
        if not r.get("completed"):
            print(f"{r['context_tokens']:>7}  {r['method']:<10}  0  (no completed move)")
            continue
        vs = f"{r['vs_live']:.1f}x" if r.get("vs_live") else "-"
        print(
            f"{r['context_tokens']:>7}  {r['method']:<10} {r['completed']:>2}  "
            f"{r['step_ms']:>7.0f} {r['gap_ms']:>7.0f} {r['extra_ms']:>9.0f} "
            f"{r['gap_steps']:>10.2f} {r['migration_ms']:>9.0f}  {vs:>10}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running pdserve cluster with two decode instances")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096],
        help="context lengths (tokens) at the moment of the move",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2, help="moves per length and method")
    parser.add_argument("--migrate-after", type=int, default=24, help="tokens before the move")
    parser.add_argument(
        "--tail-spread", type=int, default=128,
        help="shorten each prompt by a random 0..N-1 tokens so the cut lands anywhere in its "
        "last block (128: the CPU build's block size; 0: contexts exactly as given)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write every trial and the summary here")
    parser.add_argument("--log-dir", type=Path, help="logs of the cluster this script starts")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def run(url: str) -> list[Trial]:
        return asyncio.run(
            measure(url, args.lengths, args.repeats, args.migrate_after, args.tail_spread)
        )

    if args.url:
        trials = run(args.url.rstrip("/"))
    else:
        log_dir = str(args.log_dir) if args.log_dir else None
        with local_cluster(CLUSTER_ARGS, expected=3, log_dir=log_dir) as cluster:
            trials = run(cluster.url)
    rows = summarize(trials)
    print_summary(rows)
    if args.json:
        args.json.write_text(
            json.dumps({"trials": [t.row() for t in trials], "summary": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
