"""report.md, rendered from results.json's content (``CompareResults``) and nothing else."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from benchmark.compare.models import (
    CompareResults,
    CrossCheck,
    Outcome,
    RatioSpread,
    SetupResult,
    Targets,
    where,
)
from benchmark.compare.settings import (
    MIN_P99_REQUESTS,
    MIN_REPETITIONS,
    POINTS_DIR,
    TIE_MARGIN,
    CompareSettings,
)
from benchmark.compare.spread import PEAK_GOODPUT
from benchmark.compare.targets import GOODPUT_TARGET, ITL_TARGET, KNEE_ATTAINMENT
from benchmark.local_cluster import serve_settings
from pdserve.scheduler.dispatch import DispatchSettings
from pdserve.workload.metrics import LatencyStats


def num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def _stats(stats: LatencyStats) -> str:
    return f"{num(stats.mean)} / {num(stats.p50)} / {num(stats.p99)}"


def load_text(value: float) -> str:
    return f"{value:g}"


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def results_table(setups: Sequence[SetupResult], arrival: str) -> list[str]:
    load = "concurrency" if arrival == "closed" else "rate (req/s)"
    lines = [
        f"| setup | {load} | done | req/s | out tok/s | goodput (req/s) | SLO met "
        "| TTFT mean / P50 / P99 | TPOT mean / P50 / P99 | ITL mean / P50 / P99 "
        "| preemptions | migrations | disaggregated / local |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in setups:
        if not entry.points:
            why = entry.error or "not measured"
            lines.append(f"| {entry.label()} | - | {why.splitlines()[0][:120]} |" + " |" * 10)
            continue
        for point in entry.points:
            s, counters = point.summary, point.counters
            attainment = None if s.slo_attainment is None else 100 * s.slo_attainment
            dispatch = "-"
            if "dispatch_disaggregated" in counters:
                dispatch = (
                    f"{counters['dispatch_disaggregated']:.0f} / {counters['dispatch_local']:.0f}"
                )
            lines.append(
                f"| {entry.label()} | {load_text(point.load)}"
                f" | {s.completed}/{s.requests_sent}{' (time limit)' if point.timed_out else ''}"
                f" | {s.request_throughput:.3f} | {s.output_throughput:.1f}"
                f" | {num(s.goodput, 3)} | {'-' if attainment is None else f'{attainment:.0f}%'}"
                f" | {_stats(s.ttft_ms)} | {_stats(s.tpot_ms)} | {_stats(s.itl_ms)}"
                f" | {num(counters.get('preemptions'), 0)} | {num(counters.get('migrations'), 0)}"
                f" | {dispatch} |"
            )
    return lines


CACHE_KEYS = ("prefix_cache_queries", "prefix_cache_hits", "kv_received_bytes")


def cache_table(setups: Sequence[SetupResult]) -> list[str]:
    """Prefix-cache hit rate and KV bytes moved per setup and load, where counted (results
    from before these counters have none: no table)."""
    rows = [(e, p) for e in setups for p in e.points if set(CACHE_KEYS) & set(p.counters)]
    if not rows:
        return []
    lines = [
        "## Prefix cache and KV moved",
        "",
        "vLLM's prefix-cache counters (in tokens, summed over the instances: queried, found "
        "cached) and the KV bytes instances pulled from each other (pdserve's gateway), as "
        "differences over the load point. In a disaggregated setup both instances of a "
        "request look its prompt up.",
        "",
        "| setup | load | queried tokens | cached tokens | hit rate | KV moved (MB) "
        "| KV per request (kB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for entry, point in rows:
        c = point.counters
        queries, hits = c.get("prefix_cache_queries"), c.get("prefix_cache_hits")
        rate = hits / queries if hits is not None and queries else None
        moved = c.get("kv_received_bytes")
        done = point.summary.completed
        per_request = moved / done / 1e3 if moved is not None and done else None
        lines.append(
            f"| {entry.label()} | {load_text(point.load)} | {num(queries, 0)} | {num(hits, 0)}"
            f" | {'-' if rate is None else f'{100 * rate:.1f}%'}"
            f" | {num(None if moved is None else moved / 1e6)} | {num(per_request)} |"
        )
    return [*lines, ""]


def _targets_section(targets: Targets) -> list[str]:
    lines = ["## Targets (measured, not asserted)", ""]
    if not targets.p99_itl:
        lines += ["No xPyD setup and colocated setup were both measured.", ""]
        return lines
    lines += [
        f"P99 ITL of xPyD at most {ITL_TARGET}x colocated's at equal rate:",
        "",
        "| setup | baseline | rate | P99 ITL (ms) | baseline P99 ITL (ms) | ratio | target met |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in targets.p99_itl:
        lines.append(
            f"| {row.setup}{where(row.mix, row.repetition)} | {row.baseline} | {load_text(row.load)}"
            f" | {num(row.p99_itl_ms)} | {num(row.baseline_p99_itl_ms)}"
            f" | {num(row.ratio, 2)} | {_yes(row.met)} |"
        )
    lines.append("")
    if not targets.goodput:
        lines += ["Goodput: no SLO given (--slo-ttft-ms, --slo-tpot-ms), so no goodput.", ""]
        return lines
    lines += [
        f"Goodput of xPyD at least {GOODPUT_TARGET}x colocated's at the knee. The knee is the "
        f"highest rate at which the colocated baseline still meets the SLOs for "
        f"{KNEE_ATTAINMENT:.0%} of requests (its lowest rate if it never does); the peak "
        "ratio compares the best goodput of each over the whole sweep.",
        "",
        "| setup | baseline | knee (req/s) | goodput | baseline goodput | ratio | target met "
        "| peak ratio |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for g in targets.goodput:
        lines.append(
            f"| {g.setup}{where(g.mix, g.repetition)} | {g.baseline}"
            f" | {'-' if g.knee is None else load_text(g.knee)}"
            f" | {num(g.goodput, 3)} | {num(g.baseline_goodput, 3)}"
            f" | {num(g.ratio, 2)} | {_yes(g.met)} | {num(g.peak_ratio, 2)} |"
        )
    return [*lines, ""]


REPEATED_EXPLANATION = f"""\
Each ratio is the candidate's value over the baseline's, computed within one repetition
(both setups got the same prompts in it), then summarized over the repetitions: the median
and the spread (min-max). The outcome follows one rule: a spread that crosses 1.0, or
lies within {TIE_MARGIN:.0%} of it (every ratio in {1 - TIE_MARGIN:.2f}-{1 + TIE_MARGIN:.2f}), is a
**tie**; otherwise **better** or **worse** (goodput: higher is better; latencies: lower),
but only from at least {MIN_REPETITIONS} measured repetitions and, for a P99, from points of
at least {MIN_P99_REQUESTS} completed requests (else *too few repetitions* / *too few
requests*: no claim). Goodput is compared at the baseline's knee in each repetition (as in
the targets above); "best of the others" takes, per repetition, the smaller of the ratios
to each baseline, i.e. the candidate against the better of them. Latencies are compared at
equal load.
"""


def _ratio_cell(row: RatioSpread) -> str:
    return " / ".join(num(r, 2) for r in row.ratios)


def _outcome_cell(outcome: Outcome) -> str:
    return f"**{outcome}**" if outcome in (Outcome.BETTER, Outcome.WORSE) else str(outcome)


def _repeated_section(results: CompareResults) -> list[str]:
    """The ratios over the repetitions (version 2 only)."""
    if results.repeated is None:
        return []
    candidate = results.settings.candidate_name()
    lines = [
        f"## Ratios over {results.settings.repetitions} repetitions: {candidate} / baseline",
        "",
        REPEATED_EXPLANATION,
        "| mix | metric | baseline | load | better | median | min-max | per repetition "
        "| fewest requests | outcome |",
        "|---|---|---|---:|---|---:|---:|---|---:|---|",
    ]
    for row in results.repeated:
        load = load_text(row.load) if row.load is not None else "knee"
        load = "sweep" if row.metric == PEAK_GOODPUT else load
        lines.append(
            f"| {row.mix or '-'} | {row.metric} | {row.baseline} | {load} | {row.better}"
            f" | {num(row.median, 2)} | {num(row.low, 2)}-{num(row.high, 2)}"
            f" | {_ratio_cell(row)} | {num(row.min_requests, 0)} | {_outcome_cell(row.outcome)} |"
        )
    if not results.repeated:
        lines.append("| - | nothing measured | | | | | | | | |")
    return [*lines, ""]


CROSS_EXPLANATION = """\
Why the two clients can disagree, although both follow vLLM's definitions (TTFT: first chunk
with a token, minus send time; TPOT: (E2E − TTFT) / (output tokens − 1) per request, averaged;
output tokens from `usage.completion_tokens`):

1. **Where the clocks start and stop.** Both take `time.perf_counter()` just before
   `session.post(...)`, so both include connecting and sending the request. vLLM stamps a
   chunk after `response.content.iter_any()` returns a network read and parsing it; several
   SSE events that arrive in one read get (almost) the same timestamp (an ITL of ~0 for all
   but the first). pdserve's client reads line by line (`async for line in response.content`) and
   stamps each line as it is returned. The two agree when every token arrives in its own
   TCP segment, which is the normal case at these token rates.
2. **Prompts.** pdserve sends token ids, so the server tokenizes nothing and the prefill is
   exactly `--input-len` tokens. vLLM's random dataset sends text decoded from random token
   ids, which the server tokenizes again: the prefill length can drift by a few tokens
   (the mean prompt length the server counted is shown above) and tokenization time lands
   in TTFT. vLLM re-aligns the prompts to the exact length where the endpoint offers
   `/tokenize`: vllm-router forwards it to a vLLM instance, pdserve's gateway has none.
3. **Arrival times.** Both send Poisson arrivals at the same rate, but different random
   draws: which requests overlap differs, and so does queueing. At low load this changes
   little; near the knee it dominates TTFT.
4. **Not simultaneous.** The two runs are back to back on the same, shared machine; the
   load client itself runs on the cores the servers use.

The "vLLM recomputed" column passes vLLM's own per-request timings (`--save-detailed`)
through pdserve's formulas: where it matches vLLM's column, the definitions agree and any
remaining difference is measurement (points 1-4), not arithmetic.
"""


def _cross_section(cross: CrossCheck | None) -> list[str]:
    if not cross:
        return []
    lines = ["## Cross-check with `vllm bench serve`", ""]
    lines += [
        f"Setup `{cross.setup}` at {load_text(cross.rate)} req/s, "
        f"{cross.num_requests} requests of {cross.input_len} input and "
        f"{cross.output_len} output tokens.",
        "",
    ]
    if cross.error or cross.vllm is None or cross.rows is None:
        return [*lines, f"The cross-check failed: {cross.error}", ""]
    theirs = cross.vllm
    lines += [
        f"pdserve's client: {cross.pdserve_source}.",
        f"vLLM: {theirs.completed} completed, {theirs.failed} failed, mean prompt "
        f"{num(theirs.mean_input_tokens)} tokens and mean output "
        f"{num(theirs.mean_output_tokens)} tokens as the server counted them.",
        "",
        "| metric | pdserve (ms) | vllm bench serve (ms) | difference | vLLM recomputed (ms) "
        f"| within {cross.tolerance:.0%} |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in cross.rows:
        within = _yes(row.within_tolerance) if row.checked else "(not checked)"
        lines.append(
            f"| {row.metric} | {num(row.pdserve_ms)} | {num(row.vllm_ms)}"
            f" | {_pct(row.relative_difference)} | {num(row.vllm_recomputed_ms)}"
            f" | {within} |"
        )
    verdict = "agree" if cross.agree else "do NOT agree"
    lines += [
        "",
        f"TTFT and TPOT means {verdict} within {cross.tolerance:.0%}.",
        "",
        "vLLM's command:",
        "",
        "```bash",
        shlex.join(cross.argv),
        "```",
        "",
        CROSS_EXPLANATION,
    ]
    return lines


def dispatch_settings(serve_args: Sequence[str]) -> DispatchSettings:
    """The dispatch policy the pdserve setups ran with: ``DispatchSettings``' defaults, but
    for its flags among the arguments passed on to ``pdserve serve``."""
    try:
        return serve_settings(DispatchSettings, serve_args)
    except (argparse.ArgumentError, ValidationError):
        return DispatchSettings()  # pdserve serve refused them: no pdserve setup ran


def _order_notes(results: CompareResults) -> list[str]:
    """How the setups took turns and which prompts they got."""
    warmup = results.settings.warmup_requests
    if results.version == 1:
        return [
            "Setups ran one after the other, each started fresh, warmed up "
            f"({warmup} unmeasured requests with other prompts), "
            "measured at every load, and stopped (ports released) before the next started.",
            "Every setup received the same requests at a given load; each load had its own "
            "prompts (seed + load index), so vLLM's prefix cache could not serve a prompt from "
            "an earlier load.",
        ]
    return [
        f"{results.settings.repetitions} repetitions, the setups interleaved and their order "
        "rotated each time (A B C, B C A, C A B, ...). In each repetition every setup was "
        f"started fresh, warmed up ({warmup} unmeasured requests with other prompts), "
        "measured at every load of every mix, and stopped (ports released) before the next "
        "started: an idle setup left running would spin its cores and hold memory.",
        "Within a repetition every setup received the same requests at a given mix and load; "
        "every (repetition, mix, load) had its own prompts and arrival times (seed + an "
        "offset per repetition and mix + load index), so no prefix cache served a prompt "
        "twice and the spread includes the workload's own sampling.",
    ]


def _notes(results: CompareResults) -> list[str]:
    notes = [
        *_order_notes(results),
        "The router (vllm-router, Rust) or the pdserve gateway (Python), the vLLM API server "
        "processes and this load client are not pinned: they share the cores with the "
        "instances' pinned workers.",
    ]
    for entry in results.setups:
        if entry.spec.rescheduling and entry.spec.decode == 1:
            notes.append(
                f"{entry.name}: with one decode instance a request has nowhere to migrate, "
                "so rescheduling cannot act; this setup repeats its counterpart without "
                "rescheduling (differences are noise or the rescheduler's own cost)."
            )
        if any(c == "nobind" for c in entry.cores):
            notes.append(f"{entry.name}: more instances than cores, so no instance was pinned.")
    if any(e.spec.prefill for e in results.setups):
        dispatch = dispatch_settings(results.vllm_args)
        notes.append(
            "pdserve's `pd` policy prefills a short prompt "
            f"(<= {dispatch.short_prompt_tokens} tokens), or one that would wait more than "
            f"{dispatch.prefill_saturation_s:g} s for a saturated prefill pool, on the decode "
            "instance itself; the disaggregated / local column counts both kinds of placement."
        )
    load = results.machine.load_average
    end = results.load_average_end
    if load:
        notes.append(
            f"Load average (1/5/15 min) at the start: {load}; at the end: {end or '-'}. "
            "Other work on the machine shows here."
        )
    return [f"- {n}" for n in notes]


def _workload_lines(settings: CompareSettings, name: str | None = None) -> list[str]:
    """A mix's (or the only) workload, arrivals, loads and SLOs."""
    arrival = settings.arrival
    loads = settings.concurrency if arrival == "closed" else settings.rate
    fixed = settings.workload == "fixed"
    lines = [
        f"- workload: {settings.workload}"
        + (f" ({settings.input_len} input, {settings.output_len} output tokens)" if fixed else "")
        + _conversation_text(settings)
        + f", {settings.num_requests} requests per load, max context "
        f"{settings.max_context}, seed {settings.seed}",
        f"- arrivals: {arrival}"
        + (f" (burstiness {settings.burstiness})" if arrival == "gamma" else "")
        + f"; loads: {', '.join(load_text(x) for x in loads)}",
        f"- SLOs: TTFT {num(settings.slo_ttft_ms, 0)} ms, TPOT {num(settings.slo_tpot_ms, 0)} ms",
    ]
    if name is None:
        return lines
    return [f"- mix **{name}**:", *[f"  {line}" for line in lines]]


def _conversation_text(settings: CompareSettings) -> str:
    """What a conversations workload was, in words ('' for any other)."""
    if settings.workload != "conversations":
        return ""
    return (
        f" ({settings.prefix_groups} tenants with {settings.prefix_len}-token system prompts; "
        f"{settings.turns} turns of {settings.input_len}-token user messages and "
        f"{settings.output_len}-token answers, think time {settings.think_time_s:g} s mean; "
        f"prompts as {settings.conversation_prompts})"
    )


def _comparison_lines(results: CompareResults) -> list[str]:
    """Version 2: repetitions, the candidate and the workload of every mix."""
    settings = results.settings
    if results.version == 1:
        return _workload_lines(settings)
    lines = [
        f"- repetitions: {settings.repetitions}, setups interleaved, order rotated; "
        f"ratios of the candidate {settings.candidate_name()} to every other setup",
    ]
    for mix in settings.mix_list():
        lines += _workload_lines(mix.settings, mix.name)
    return lines


def _settings_section(results: CompareResults) -> list[str]:
    settings, model = results.settings, results.model
    return [
        "## Settings",
        "",
        f"- model: {model.loaded} (served as {model.served_name or model.loaded})",
        *_comparison_lines(results),
        f"- KV cache per instance: {settings.kv_cache_gib} GiB; vLLM arguments: "
        f"{shlex.join(results.vllm_args) or '(none)'}",
        f"- plain vLLM patched like pdserve instances (CPU build): {settings.patch_plain_vllm}",
        f"- sampling: temperature {settings.temperature:g}, ignore_eos {settings.ignore_eos}",
        f"- time limit per load: {settings.time_limit_s:g} s",
        "",
    ]


def _setups_section(setups: Sequence[SetupResult]) -> list[str]:
    out = [
        "## Setups",
        "",
        "| setup | what runs | cores per instance | started in |",
        "|---|---|---|---:|",
    ]
    # One row per start (a start serves every mix), command lines of the first repetition.
    starts = list({(e.name, e.repetition): e for e in reversed(setups)}.values())[::-1]
    for entry in starts:
        start = entry.start_s
        out.append(
            f"| {entry.name}{where(None, entry.repetition)} | {entry.description}"
            f" | {', '.join(entry.cores)} | {'-' if start is None else f'{start:.0f} s'} |"
        )
    out += ["", "Command lines (ports are picked at run time):", ""]
    for entry in starts:
        if (entry.repetition or 1) > 1:
            continue
        for proc in entry.processes:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in proc.env.items())
            out.append(
                f"- {entry.name} / {proc.name}: `{(env + ' ') if env else ''}"
                f"{shlex.join(proc.argv)}`"
            )
    return out


def render_report(results: CompareResults | Mapping[str, Any]) -> str:
    """report.md from results.json's content."""
    if not isinstance(results, CompareResults):
        results = CompareResults.model_validate(results)
    machine = results.machine
    out = [
        "# pdserve bench compare",
        "",
        f"{results.started_at} to {results.finished_at or '(unfinished)'}, "
        f"{results.instances} vLLM instances per setup.",
        "",
        "Reproduce (from the repository root, after `scripts/setup.sh --bench`):",
        "",
        "```bash",
        results.command,
        "```",
        "",
        "## Machine",
        "",
        f"- CPU: {machine.cpu_model}, {machine.logical_cpus} logical CPUs, "
        f"usable here: {machine.usable_cpus}",
        f"- RAM: {num(machine.ram_gib)} GiB",
        f"- OS: {machine.os}, Python {machine.python}",
        "",
        "## Versions",
        "",
        *[f"- {name}: {version or 'not installed'}" for name, version in results.versions.items()],
        "",
        *_settings_section(results),
        *_setups_section(results.setups),
        "",
        "## Results",
        "",
        "Latencies in ms (mean / P50 / P99). Goodput: completed requests per second meeting "
        "every SLO; SLO met: their share of the requests sent. Preemptions: vLLM's counter "
        "summed over the instances; migrations and placements: pdserve's gateway counters "
        "(differences over the load point).",
        "",
        *results_table(results.setups, results.settings.arrival),
        "",
        *cache_table(results.setups),
    ]
    for entry in results.setups:
        if entry.error:
            out += [f"**{entry.name} failed:**", "", "```text", entry.error[-3000:], "```", ""]
    out += _targets_section(results.targets)
    out += _repeated_section(results)
    out += _cross_section(results.cross_check)
    plots = [Path(p).name for p in results.plots]
    if plots:
        out += ["## Figures", ""]
        out += [f"![{name}]({name})" for name in plots]
        out.append("")
    out += ["## Notes", "", *_notes(results), ""]
    out += [
        f"Per-request records: `{POINTS_DIR}/`. Process logs: `{results.log_dir}` "
        "(not part of the results).",
        "",
    ]
    return "\n".join(out)
