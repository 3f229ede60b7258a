"""The cross-check: vLLM's own ``vllm bench serve`` against one setup at one rate.

It gets the same fixed lengths, request count, rate, arrivals and sampling as pdserve's client;
its saved JSON is read in ``Summary``'s terms and its per-request timings (``--save-detailed``)
are passed through pdserve's formulas, so a difference in definitions and a difference in
measurement can be told apart (report.md explains the remaining ones).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmark.compare.models import CrossRow, PercentileStats, VllmBenchResult
from benchmark.compare.settings import CompareSettings
from pdserve.cluster.processes import ManagedProcess
from pdserve.workload.metrics import RequestRecord, Summary
from pdserve.workload.workloads import cap_lengths

CROSS_DIR = "cross-check"
RESULT_FILE = "vllm-bench-serve.json"
LOG_FILE = "vllm-bench-serve.log"


def vllm_cli() -> list[str]:
    script = Path(sys.executable).with_name("vllm")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def cross_check_lengths(settings: CompareSettings) -> tuple[int, int]:
    """The fixed (input, output) lengths both clients use, capped like pdserve's workload."""
    return cap_lengths(settings.input_len, settings.output_len, settings.max_context)


def vllm_bench_argv(
    settings: CompareSettings,
    endpoint: str,
    served_model: str,
    tokenizer: str,
    rate: float,
    result_dir: Path,
    result_file: str,
    cli: Sequence[str] | None = None,
) -> list[str]:
    """``vllm bench serve`` with the same lengths, count, rate, arrivals and sampling."""
    input_len, output_len = cross_check_lengths(settings)
    burstiness = settings.burstiness if settings.arrival == "gamma" else 1.0
    options = {
        "--backend": "openai",
        "--base-url": endpoint,
        "--endpoint": "/v1/completions",
        "--model": served_model,
        "--tokenizer": tokenizer,
        "--dataset-name": "random",
        "--random-input-len": str(input_len),
        "--random-output-len": str(output_len),
        "--random-range-ratio": "0",
        "--num-prompts": str(settings.num_requests),
        "--request-rate": f"{rate:g}",
        "--burstiness": f"{burstiness:g}",
        "--seed": str(settings.seed),
        "--temperature": f"{settings.temperature:g}",
        "--percentile-metrics": "ttft,tpot,itl,e2el",
        "--metric-percentiles": "50,90,99",
    }
    argv = [*(cli if cli is not None else vllm_cli()), "bench", "serve"]
    argv += [word for option in options.items() for word in option]
    argv += ["--save-result", "--save-detailed", "--result-dir", str(result_dir)]
    argv += ["--result-filename", result_file, "--disable-tqdm"]
    if settings.ignore_eos:
        argv.append("--ignore-eos")
    goodput = []
    if settings.slo_ttft_ms is not None:
        goodput.append(f"ttft:{settings.slo_ttft_ms:g}")
    if settings.slo_tpot_ms is not None:
        goodput.append(f"tpot:{settings.slo_tpot_ms:g}")
    if goodput:
        argv += ["--goodput", *goodput]
    return argv


def run_vllm_bench(
    argv: Sequence[str], result_path: Path, log_path: Path, timeout_s: float, env: dict[str, str]
) -> dict[str, Any]:
    """Runs ``vllm bench serve`` to the end and reads the JSON it saved (vLLM's format)."""
    proc = ManagedProcess("vllm-bench-serve", argv, log_path, env={**os.environ, **env})
    try:
        code = proc.proc.wait(timeout_s)
    except subprocess.TimeoutExpired as error:
        proc.stop()
        raise TimeoutError(
            f"vllm bench serve ran past {timeout_s:.0f} s (log {log_path})"
        ) from error
    proc.stop()
    if code != 0 or not result_path.is_file():
        raise RuntimeError(
            f"vllm bench serve exited with code {code}; last lines of {log_path}:\n"
            f"{proc.log_tail(20)}"
        )
    data: dict[str, Any] = json.loads(result_path.read_text())
    return data


def _stat(data: dict[str, Any], metric: str) -> PercentileStats:
    def get(*keys: str) -> float | None:
        for key in keys:
            value = data.get(key)
            if isinstance(value, int | float):
                return float(value)
        return None

    return {
        "mean": get(f"mean_{metric}_ms"),
        "p50": get(f"p50_{metric}_ms", f"median_{metric}_ms"),
        "p90": get(f"p90_{metric}_ms"),
        "p99": get(f"p99_{metric}_ms"),
    }


def parse_vllm_bench(data: dict[str, Any]) -> VllmBenchResult:
    """The numbers of a ``vllm bench serve --save-result`` JSON, in ``Summary``'s terms."""
    completed = int(data.get("completed") or 0)
    return VllmBenchResult(
        completed=completed,
        failed=int(data.get("failed") or 0),
        duration_s=data.get("duration"),
        request_throughput=data.get("request_throughput"),
        output_throughput=data.get("output_throughput"),
        goodput=data.get("request_goodput"),
        # Prompt tokens as the server counted them (usage.prompt_tokens).
        mean_input_tokens=data["total_input_tokens"] / completed if completed else None,
        mean_output_tokens=data["total_output_tokens"] / completed if completed else None,
        ttft_ms=_stat(data, "ttft"),
        tpot_ms=_stat(data, "tpot"),
        itl_ms=_stat(data, "itl"),
        e2e_ms=_stat(data, "e2el"),
    )


def records_from_vllm_bench(data: dict[str, Any]) -> list[RequestRecord] | None:
    """vLLM's per-request timings (``--save-detailed``) as pdserve records, if present."""
    keys = ("ttfts", "itls", "latencies", "output_lens", "input_lens", "errors")
    if not all(isinstance(data.get(k), list) for k in keys):
        return None
    records = []
    for i, (ttft, itl, latency, out, inp, error) in enumerate(
        zip(*(data[k] for k in keys), strict=False)
    ):
        ok = not error and out > 0
        records.append(
            RequestRecord(
                index=i,
                input_len=inp,
                output_len=out,
                start_s=0.0,
                ttft_s=ttft if ok else None,
                itl_s=list(itl) if ok else [],
                e2e_s=latency if ok else None,
                output_tokens=out,
                success=ok,
                error=str(error or ""),
            )
        )
    return records


CROSS_METRICS = (
    # (row, summary field, statistic, one of the two checked against the tolerance)
    ("TTFT mean", "ttft_ms", "mean", True),
    ("TPOT mean", "tpot_ms", "mean", True),
    ("TTFT P50", "ttft_ms", "p50", False),
    ("TTFT P99", "ttft_ms", "p99", False),
    ("TPOT P50", "tpot_ms", "p50", False),
    ("TPOT P99", "tpot_ms", "p99", False),
    ("ITL mean", "itl_ms", "mean", False),
    ("ITL P99", "itl_ms", "p99", False),
    ("E2E mean", "e2e_ms", "mean", False),
)


def cross_check_rows(
    ours: Summary,
    theirs: VllmBenchResult,
    tolerance: float,
    recomputed: Summary | None = None,
) -> list[CrossRow]:
    """One row per metric: pdserve's client, vllm bench serve, relative difference."""
    rows = []
    for name, field, stat, checked in CROSS_METRICS:
        mine = getattr(getattr(ours, field), stat)
        other = getattr(theirs, field).get(stat)
        again = getattr(getattr(recomputed, field), stat) if recomputed is not None else None
        diff = (other - mine) / mine if mine and other is not None else None
        rows.append(
            CrossRow(
                metric=name,
                pdserve_ms=mine,
                vllm_ms=other,
                vllm_recomputed_ms=again,
                relative_difference=diff,
                checked=checked,
                within_tolerance=None if diff is None else abs(diff) <= tolerance,
            )
        )
    return rows
