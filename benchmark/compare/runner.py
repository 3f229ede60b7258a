"""The comparison itself: every setup started alone, warmed up, swept, cross-checked, stopped;
results.json and report.md rewritten after every step, so an interrupted run leaves its
results so far."""

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
from benchmark.compare.models import CompareResults, CrossCheck, ModelInfo, PointEntry, SetupResult
from benchmark.compare.report import load_text, num, render_report
from benchmark.compare.settings import (
    COMPARE_LIST_FIELDS,
    EXCLUDED,
    REPORT_FILE,
    RESULTS_FILE,
    CompareSettings,
)
from benchmark.compare.targets import evaluate_targets
from benchmark.run import load_points, result_path, write_result
from benchmark.setups import ROUTER, Launch, SetupSpec, parse_setup, plan_setup, router_available
from pdserve.cluster.processes import free_port
from pdserve.instance.environment import is_cpu_build
from pdserve.protocol.net import available_cores
from pdserve.workload.metrics import PointResult, summarize
from pdserve.workload.workloads import BenchRequest, Tokenizer, build_workload, load_tokenizer

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
        self.points: list[tuple[str, PointResult]] = []
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

    def requests(self, seed: int, **update: Any) -> list[BenchRequest]:
        return build_workload(
            self.settings.model_copy(update={"seed": seed, **update}), self.tokenizer
        )

    def run(self) -> dict[str, Any]:
        """Measures every setup; returns results.json's content."""
        loads = load_points(self.settings)
        names = self.settings.setup_names()
        _log(f"setups {', '.join(names)}; loads {', '.join(load_text(x) for x in loads)}")
        try:
            for name in names:
                self.run_setup(parse_setup(name, self.settings.instances), loads)
        finally:
            self.finish()
        return self.results.to_json()

    def run_setup(self, spec: SetupSpec, loads: Sequence[float]) -> None:
        log_dir = self.log_dir / spec.name
        plan = plan_setup(spec, self.launch, log_dir, self.port)
        entry = SetupResult.model_validate(plan.as_json() | {"spec": dataclasses.asdict(spec)})
        self.results.setups.append(entry)
        _log(f"{spec.name}: starting ({spec.describe()}; logs in {log_dir})")
        started = time.monotonic()
        try:
            running = self.start(plan, log_dir, self.settings.start_timeout_s)
        except (RuntimeError, TimeoutError, OSError) as error:
            entry.error = f"did not start: {error}"
            _log(f"{spec.name}: {entry.error}")
            self.save()
            return
        entry.start_s = time.monotonic() - started
        _log(f"{spec.name}: ready in {entry.start_s:.0f} s at {running.endpoint}")
        try:
            self.sweep(spec, running, entry, loads)
            if self.settings.cross_check and spec.name == self.settings.cross_check_target()[0]:
                self.results.cross_check = self.cross_check(spec, running, entry, loads)
        except SETUP_ERRORS as error:
            entry.error = f"{type(error).__name__}: {error}"
            _log(f"{spec.name}: failed: {error}")
        finally:
            _log(f"{spec.name}: stopping")
            running.stop()
            self.save()

    # sweep and cross_check take the same arguments: both act on the running setup's entry.
    def sweep(
        self, spec: SetupSpec, running: Running, entry: SetupResult, loads: Sequence[float]
    ) -> None:
        settings = self.settings
        if settings.warmup_requests:
            # Seeds: load i has seed + i, the cross-check seed + len(loads), the warm-up next.
            seed = settings.seed + len(loads) + 1
            point = point_settings(settings, spec.name, running.endpoint, seed)
            warm = self.requests(seed, num_requests=settings.warmup_requests)
            entry.warmup_ok = self.warm(point, warm, spec.instances)
            if entry.warmup_ok == 0:
                raise RuntimeError(f"no warm-up request succeeded at {running.endpoint}")
        for index, load in enumerate(loads):
            seed = settings.seed + index
            point = point_settings(settings, spec.name, running.endpoint, seed)
            before = running.counters()
            result = self.measure(point, load, self.requests(seed))
            after = running.counters()
            path = write_result(result, result_path(point, load))
            self.points.append((spec.name, result))
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
                f"{spec.name} @ {load_text(load)}: {s.completed}/{s.requests_sent} done, "
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
                settings, f"{spec.name}-cross-check", running.endpoint, seed, workload="fixed"
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
        (self.output_dir / RESULTS_FILE).write_text(json.dumps(self.results.to_json(), indent=1))
        (self.output_dir / REPORT_FILE).write_text(render_report(self.results))

    def finish(self) -> None:
        self.results.finished_at = now()
        self.results.load_average_end = load_average()
        if self.settings.plots:
            paths = draw_plots(self.points, self.output_dir, self.settings.arrival)
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
