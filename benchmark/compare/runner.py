"""The comparison itself: every setup started alone, warmed up, swept over every mix,
cross-checked, stopped; all that once per repetition, the setups' order rotated each time;
results.json and report.md rewritten after every step, so an interrupted run leaves its
results so far.

Each setup is started fresh in every repetition rather than kept running while the others
run: two setups never share the machine (an idle vLLM instance with the ``mq_busy_loop``
patch still spins its core, and three setups' instances do not fit in this machine's RAM),
and a fresh start leaves no warm cache or state from an earlier repetition. Within a start
every mix is measured, so a start (~30 s per instance) is paid once per setup and repetition,
not once per mix."""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from benchmark.command import Bench
from benchmark.compare.crosscheck import (
    CROSS_DIR,
    LOG_FILE,
    RESULT_FILE,
    cross_check_lengths,
    cross_check_rows,
    parse_vllm_bench,
    records_from_vllm_bench,
    run_vllm_bench,
    vllm_bench_argv,
)
from benchmark.compare.environment import (
    command_line,
    load_average,
    machine_info,
    now,
    software_versions,
)
from benchmark.compare.figures import draw_plots
from benchmark.compare.measure import (
    Measure,
    Running,
    Start,
    Warm,
    measure_point,
    point_settings,
    start_setup,
    warm_up,
)
from benchmark.compare.models import (
    CompareResults,
    CrossCheck,
    ModelInfo,
    PointEntry,
    SetupResult,
)
from benchmark.compare.report import load_text, num, render_report
from benchmark.compare.settings import (
    COMPARE_LIST_FIELDS,
    EXCLUDED,
    REPORT_FILE,
    RESULTS_FILE,
    CompareSettings,
    Mix,
    warn_about,
)
from benchmark.compare.spread import repeated_ratios
from benchmark.compare.targets import evaluate_targets
from benchmark.run import load_points, result_path, write_result
from benchmark.setups import (
    ROUTER,
    Launch,
    SetupPlan,
    SetupSpec,
    parse_setup,
    plan_setup,
    router_available,
)
from pdserve.cluster.processes import free_port
from pdserve.instance.environment import is_cpu_build
from pdserve.protocol.net import available_cores
from pdserve.workload.metrics import PointResult, summarize
from pdserve.workload.workloads import (
    BenchRequest,
    Tokenizer,
    build_workload,
    load_tokenizer,
    split_warmup,
)

# A setup that fails this way is reported, and the comparison goes on with the next one.
SETUP_ERRORS = (RuntimeError, TimeoutError, OSError, ValueError, aiohttp.ClientError)


def _log(message: str) -> None:
    print(f"[bench compare] {message}", file=sys.stderr, flush=True)


def make_launch(settings: CompareSettings, vllm_args: Sequence[str]) -> Launch:
    """Resolves the model (the bundled one is prepared once) and reads the machine."""
    from pdserve import bundled_model

    model, served = bundled_model.resolve(settings.model)
    return Launch(
        settings=settings,
        model=model,
        served_name=served,
        user_model=settings.model,
        vllm_args=tuple(vllm_args),
        cpu=is_cpu_build(),
        cores=tuple(available_cores()),
    )


# What a start of one setup takes here, for the planned wall time (instances start together).
START_GUESS_S = 45.0


def rotation(names: Sequence[str], repetition: int) -> list[str]:
    """The setups' order in ``repetition`` (0-based): A B C, B C A, C A B, A B C, ... so
    that no setup always runs first (on a cold machine) or right after the same other one."""
    shift = repetition % len(names) if names else 0
    return [*names[shift:], *names[:shift]]


def seed_base(settings: CompareSettings, repetition: int, mix_index: int) -> int:
    """The first seed of a (repetition, mix): load i has base + i, the cross-check base +
    loads, the warm-up base + loads + 1. Repetition 0's first mix keeps version 1's seeds;
    every other (repetition, mix) has fresh prompts (and arrival times) of its own, the same
    for every setup of the repetition."""
    mixes = settings.mix_list()
    stride = max(len(load_points(m.settings)) for m in mixes) + 2
    return settings.seed + (repetition * len(mixes) + mix_index) * stride


def planned_s(settings: CompareSettings, start_s: float = START_GUESS_S) -> float:
    """A lower bound on the wall time: starts and arrival spans, no drain, no warm-up."""
    per_start = start_s
    for mix in settings.mix_list():
        if mix.settings.arrival != "closed":
            finite = [r for r in mix.settings.rate if r != float("inf")]
            per_start += sum(mix.settings.num_requests / r for r in finite)
    return settings.repetitions * len(settings.setup_names()) * per_start


def default_log_dir() -> Path:
    from pdserve import bundled_model

    return bundled_model.cache_root() / "logs" / ("compare-" + time.strftime("%Y%m%d-%H%M%S"))


class Comparison:
    """One ``pdserve bench compare`` run; ``results`` is results.json, typed."""

    def __init__(
        self,
        settings: CompareSettings,
        launch: Launch,
        command: str,
        *,
        start: Start = start_setup,
        measure: Measure = measure_point,
        warm: Warm = warm_up,
        vllm_bench: Callable[..., dict[str, Any]] = run_vllm_bench,
        port: Callable[[], int] = free_port,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.settings = settings
        self.launch = launch
        self.start, self.measure, self.warm, self.vllm_bench = start, measure, warm, vllm_bench
        self.port = port
        self.tokenizer = tokenizer
        self.output_dir = Path(settings.output_dir)
        self.log_dir = Path(settings.log_dir) if settings.log_dir else default_log_dir()
        # (series, mix, point) for the figures.
        self.points: list[tuple[str, str | None, PointResult]] = []
        self.results = CompareResults(
            command=command,
            started_at=now(),
            instances=settings.instances,
            machine=machine_info(),
            versions=software_versions(),
            settings=settings,
            vllm_args=list(launch.vllm_args),
            model=ModelInfo(loaded=launch.model, served_name=launch.served_name),
            log_dir=str(self.log_dir),
        )

    def requests(
        self, seed: int, settings: CompareSettings | None = None, **update: Any
    ) -> list[BenchRequest]:
        settings = settings or self.settings
        return build_workload(settings.model_copy(update={"seed": seed, **update}), self.tokenizer)

    def run(self) -> dict[str, Any]:
        """Measures every setup in every repetition; returns results.json's content."""
        settings = self.settings
        names = settings.setup_names()
        mixes = settings.mix_list()
        _log(
            f"setups {', '.join(names)}; {settings.repetitions} repetition(s); mixes "
            f"{', '.join(m.name or '(flags)' for m in mixes)}; at least "
            f"{planned_s(settings) / 60:.0f} min (starts and arrivals)"
        )
        for warning in warn_about(settings):
            _log(f"warning: {warning}")
        try:
            for repetition in range(settings.repetitions):
                for name in rotation(names, repetition):
                    self.run_setup(parse_setup(name, settings.instances), repetition + 1, mixes)
        finally:
            self.finish()
        return self.results.to_json()

    def _entries(self, plan: SetupPlan, repetition: int, mixes: Sequence[Mix]) -> list[SetupResult]:
        """One results.json entry per mix of this start of a setup (no repetition number
        where there is one pass: nothing to tell apart)."""
        numbered = repetition if self.settings.repetitions > 1 else None
        base = plan.as_json() | {"spec": dataclasses.asdict(plan.spec), "repetition": numbered}
        entries = [SetupResult.model_validate(base | {"mix": m.name}) for m in mixes]
        self.results.setups += entries
        return entries

    def run_setup(self, spec: SetupSpec, repetition: int, mixes: Sequence[Mix]) -> None:
        """Starts the setup, warms it up, measures every mix, stops it."""
        log_dir = self.log_dir / spec.name / f"r{repetition}"
        plan = plan_setup(spec, self.launch, log_dir, self.port)
        entries = self._entries(plan, repetition, mixes)
        _log(f"{spec.name} (rep {repetition}): starting ({spec.describe()}; logs in {log_dir})")
        started = time.monotonic()
        try:
            running = self.start(plan, log_dir, self.settings.start_timeout_s)
        except (RuntimeError, TimeoutError, OSError) as error:
            for entry in entries:
                entry.error = f"did not start: {error}"
            _log(f"{spec.name}: {entries[0].error}")
            self.save()
            return
        start_s = time.monotonic() - started
        for entry in entries:
            entry.start_s = start_s
        _log(f"{spec.name}: ready in {start_s:.0f} s at {running.endpoint}")
        try:
            self.measure_mixes(spec, running, entries, mixes)
        finally:
            _log(f"{spec.name}: stopping")
            running.stop()
            self.save()

    def measure_mixes(
        self,
        spec: SetupSpec,
        running: Running,
        entries: Sequence[SetupResult],
        mixes: Sequence[Mix],
    ) -> None:
        """The warm-up (once per start), then every mix; a failure ends this start."""
        entry = entries[0]
        try:
            self.warm_setup(spec, running, entry, mixes[0])
            for index, (mix_entry, mix) in enumerate(zip(entries, mixes, strict=True)):
                entry = mix_entry
                loads = load_points(mix.settings)
                self.sweep(spec, running, entry, mix, index)
                if self._cross_checks(spec, entry):
                    self.results.cross_check = self.cross_check(spec, running, entry, loads)
        except SETUP_ERRORS as error:
            entry.error = f"{type(error).__name__}: {error}"
            _log(f"{spec.name}: failed: {error}")
            for later in entries[entries.index(entry) + 1 :]:
                later.error = f"not measured: this start failed at mix {entry.mix}"

    def _cross_checks(self, spec: SetupSpec, entry: SetupResult) -> bool:
        """In the first repetition only (version 1 ran it once), on the chosen setup."""
        return (
            self.settings.cross_check
            and (entry.repetition or 1) == 1
            and spec.name == self.settings.cross_check_target()[0]
        )

    def warm_setup(self, spec: SetupSpec, running: Running, entry: SetupResult, mix: Mix) -> None:
        settings = mix.settings
        if not settings.warmup_requests:
            return
        repetition = (entry.repetition or 1) - 1
        seed = seed_base(self.settings, repetition, 0) + len(load_points(settings)) + 1
        point = point_settings(
            settings, spec.name, running.endpoint, seed, send_priority=spec.priorities
        )
        warm = self.requests(seed, settings, num_requests=settings.warmup_requests)
        entry.warmup_ok = self.warm(point, warm, spec.instances)
        if entry.warmup_ok == 0:
            raise RuntimeError(f"no warm-up request succeeded at {running.endpoint}")

    def _point_label(self, spec: SetupSpec, entry: SetupResult) -> str:
        """The points' file names: version 1's where there is one pass of one mix."""
        if self.settings.repetitions == 1 and not self.settings.mixes:
            return spec.name
        return "-".join([spec.name, *([entry.mix] if entry.mix else []), f"r{entry.repetition}"])

    def sweep(
        self, spec: SetupSpec, running: Running, entry: SetupResult, mix: Mix, mix_index: int
    ) -> None:
        settings = mix.settings
        base = seed_base(self.settings, (entry.repetition or 1) - 1, mix_index)
        label = self._point_label(spec, entry)
        for index, load in enumerate(load_points(settings)):
            seed = base + index
            point = point_settings(
                settings, label, running.endpoint, seed, send_priority=spec.priorities
            )
            warm, requests = split_warmup(self.requests(seed, settings))
            if warm:  # the point's tenants' system prompts, before its counters are read
                self.warm(point, warm, spec.instances)
            before = running.counters()
            result = self.measure(point, load, requests)
            after = running.counters()
            path = write_result(result, result_path(point, load))
            series = spec.name if self.settings.repetitions == 1 else entry.label()
            self.points.append((series, mix.name, result))
            s = result.summary
            entry.points.append(
                PointEntry(
                    load=load,
                    file=str(path.relative_to(self.output_dir)),
                    timed_out=result.timed_out,
                    summary=s,
                    counters={k: after[k] - before[k] for k in after if k in before},
                )
            )
            _log(
                f"{entry.label()} @ {load_text(load)}: {s.completed}/{s.requests_sent} done, "
                f"TTFT P99 {num(s.ttft_ms.p99)} ms, ITL P99 {num(s.itl_ms.p99)} ms, "
                f"goodput {num(s.goodput, 3)} req/s"
            )
            self.save()
            running.check_alive()

    def cross_check(
        self, spec: SetupSpec, running: Running, entry: SetupResult, loads: Sequence[float]
    ) -> CrossCheck:
        settings = self.settings
        _, rate = settings.cross_check_target()
        input_len, output_len = cross_check_lengths(settings)
        if settings.workload == "fixed" and rate in loads:
            ours = entry.points[list(loads).index(rate)].summary
            source = f"the sweep's point at {load_text(rate)} req/s"
        else:
            seed = settings.seed + len(loads)
            point = point_settings(
                settings,
                f"{spec.name}-cross-check",
                running.endpoint,
                seed,
                workload="fixed",
                send_priority=spec.priorities,
            )
            _log(f"cross-check: pdserve's client at {load_text(rate)} req/s (fixed lengths)")
            result = self.measure(point, rate, self.requests(seed, workload="fixed"))
            write_result(result, result_path(point, rate))
            ours = result.summary
            source = "a separate run of fixed-length requests just before"
        tokenizer = settings.tokenizer or self.launch.model
        served = self.launch.served_name or self.launch.model
        result_dir = self.output_dir / CROSS_DIR
        result_dir.mkdir(parents=True, exist_ok=True)
        argv = vllm_bench_argv(
            settings, running.endpoint, served, tokenizer, rate, result_dir, RESULT_FILE
        )
        cross = CrossCheck(
            setup=spec.name,
            rate=rate,
            num_requests=settings.num_requests,
            input_len=input_len,
            output_len=output_len,
            tolerance=settings.cross_check_tolerance,
            pdserve_source=source,
            pdserve=ours,
            argv=argv,
        )
        env = {"VLLM_TARGET_DEVICE": "cpu"} if self.launch.cpu else {}
        _log(f"cross-check: vllm bench serve at {load_text(rate)} req/s")
        try:
            data = self.vllm_bench(
                argv,
                result_dir / RESULT_FILE,
                self.log_dir / LOG_FILE,
                settings.time_limit_s + 300,
                env,
            )
        except (RuntimeError, TimeoutError, OSError, ValueError) as error:
            cross.error = f"{type(error).__name__}: {error}"
            _log(f"cross-check failed: {error}")
            return cross
        records = records_from_vllm_bench(data)
        recomputed = (
            summarize(
                records, data.get("duration") or 0.0, settings.slo_ttft_ms, settings.slo_tpot_ms
            )
            if records
            else None
        )
        cross.vllm = parse_vllm_bench(data)
        cross.rows = cross_check_rows(ours, cross.vllm, settings.cross_check_tolerance, recomputed)
        cross.agree = all(r.within_tolerance for r in cross.rows if r.checked)
        _log("cross-check: TTFT/TPOT " + ("agree" if cross.agree else "do not agree"))
        return cross

    def save(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.results.targets = evaluate_targets(self.results.setups)
        settings = self.settings
        goodput = any(
            m.settings.slo_ttft_ms is not None or m.settings.slo_tpot_ms is not None
            for m in settings.mix_list()
        )
        self.results.repeated = repeated_ratios(
            self.results.setups, settings.candidate_name(), goodput
        )
        (self.output_dir / RESULTS_FILE).write_text(json.dumps(self.results.to_json(), indent=1))
        (self.output_dir / REPORT_FILE).write_text(render_report(self.results))

    def finish(self) -> None:
        self.results.finished_at = now()
        self.results.load_average_end = load_average()
        if self.settings.plots:
            paths = []
            for mix in self.settings.mix_list():
                points = [(series, p) for series, m, p in self.points if m == mix.name]
                prefix = f"{mix.name}-" if mix.name else ""
                paths += draw_plots(points, self.output_dir, mix.settings.arrival, prefix)
            self.results.plots = [str(p.relative_to(self.output_dir)) for p in paths]
        self.save()
        _log(f"report: {self.output_dir / REPORT_FILE}")

    def ok(self) -> bool:
        """Every setup ran and every load completed a request."""
        return all(
            not e.error and e.points and all(p.summary.completed for p in e.points)
            for e in self.results.setups
        )


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(settings: CompareSettings, vllm_args: Sequence[str], argv: Sequence[str]) -> int:
    """Runs the comparison; 0 when every setup ran and every load completed a request."""
    if ROUTER in settings.setup_names() and not router_available():
        print(
            "pdserve bench compare: the vllm-router setup needs the vllm-router package: "
            "scripts/setup.sh --bench (or pip install 'vllm-router>=0.1,<0.2')",
            file=sys.stderr,
        )
        return 2
    launch = make_launch(settings, vllm_args)
    if settings.tokenizer is None and (settings.model is None or Path(launch.model).is_dir()):
        # The served model's own tokenizer: prompts are then exact token ids.
        settings = settings.model_copy(update={"tokenizer": launch.model})
    tokenizer = load_tokenizer(settings.tokenizer) if settings.tokenizer else None
    comparison = Comparison(settings, launch, command_line(argv), tokenizer=tokenizer)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        comparison.run()
    except KeyboardInterrupt:
        _log("interrupted; the setup that was running has been stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if comparison.ok() else 1


BENCH = Bench(CompareSettings, main, exclude=EXCLUDED, list_fields=COMPARE_LIST_FIELDS)
