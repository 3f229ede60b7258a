"""``pdserve bench compare`` without vLLM: setups' command lines, process handling on fake
servers, the sweep's order, the report, and reading ``vllm bench serve``'s JSON."""

from __future__ import annotations

import json
import shlex
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from benchmark import compare
from benchmark.compare import (
    CompareResults,
    CompareSettings,
    Comparison,
    cross_check_rows,
    evaluate_targets,
    knee_load,
    parse_vllm_bench,
    records_from_vllm_bench,
    render_report,
    run_vllm_bench,
    settings_from_args,
    vllm_bench_argv,
)
from benchmark.run import RunSettings
from benchmark.setups import (
    Launch,
    RunningSetup,
    SetupPlan,
    SetupSettings,
    default_setups,
    metric_total,
    parse_setup,
    plan_setup,
)
from pdserve.cli import build_parser
from pdserve.workload.metrics import LatencyStats, PointResult, Summary, summarize
from pdserve.workload.workloads import BenchRequest
from tests.unit import compare_fakes
from tests.unit.compare_fakes import Fake, serve_in_thread

FIXTURE = Path(__file__).parent / "data" / "vllm_bench_serve.json"
COMMITTED = Path(__file__).resolve().parents[2] / "benchmark" / "results" / "compare-2core"
FAKES = Path(compare_fakes.__file__)


def ports(start: int = 9100) -> Callable[[], int]:
    counter = iter(range(start, start + 100))
    return lambda: next(counter)


def launch(**settings: Any) -> Launch:
    fields = {k: settings.pop(k) for k in list(settings) if k in SetupSettings.model_fields}
    values: dict[str, Any] = {
        "settings": SetupSettings(**fields),
        "model": "/cache/models/SmolLM2-135M-Instruct",
        "served_name": "SmolLM2-135M-Instruct",
        "user_model": None,
        "vllm_args": ("--max-num-seqs", "8"),
        "cpu": True,
        "cores": (0, 1),
    }
    return Launch(**(values | settings))


def plan(name: str, log_dir: Path = Path("/logs"), **settings: Any) -> SetupPlan:
    made = launch(**settings)
    return plan_setup(parse_setup(name, made.settings.instances), made, log_dir, ports())


# --- setups -----------------------------------------------------------------------------


def test_setup_names() -> None:
    assert default_setups(2) == [
        "vllm-router",
        "pdserve-rr",
        "pdserve-1p1d",
        "pdserve-1p1d-resched",
    ]
    assert default_setups(4)[2:] == ["pdserve-2p2d", "pdserve-2p2d-resched"]
    assert default_setups(1) == ["vllm-router", "pdserve-rr"]
    one = parse_setup("pdserve-1p3d-resched", 4)
    assert (one.prefill, one.decode, one.both, one.policy, one.rescheduling) == (
        1,
        3,
        0,
        "pd",
        True,
    )
    assert parse_setup("pdserve-rr", 3).both == 3
    with pytest.raises(ValueError, match="X \\+ Y"):
        parse_setup("pdserve-1p2d", 2)
    with pytest.raises(ValueError, match="unknown setup"):
        parse_setup("sglang", 2)


def test_vllm_router_setup_plain_instances_on_their_own_cores() -> None:
    p = plan("vllm-router", kv_cache_gib=3)
    first, second, router = p.processes
    assert [first.name, second.name, router.name] == ["vllm-0", "vllm-1", "vllm-router"]
    assert first.argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert first.argv[3:] == [
        "--model", "/cache/models/SmolLM2-135M-Instruct",
        "--served-model-name", "SmolLM2-135M-Instruct",
        "--host", "127.0.0.1", "--port", "9100",
        "--dtype", "float32", "--enforce-eager",
        "--max-num-seqs", "8",
    ]  # fmt: skip
    assert first.env == {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "3",
        "VLLM_CPU_OMP_THREADS_BIND": "0",
        "PDSERVE_VLLM_PATCHES": "mq_busy_loop",
    }
    assert second.env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert p.cores == ["0", "1"]
    assert first.ready_url == "http://127.0.0.1:9100/health"
    urls = ["http://127.0.0.1:9100", "http://127.0.0.1:9101"]
    assert p.instance_urls == urls
    args = router.argv[3:]
    assert router.argv[1:3] == ["-m", "vllm_router.launch_router"]
    assert args[args.index("--worker-urls") + 1 : args.index("--policy")] == urls
    assert args[args.index("--policy") + 1] == "round_robin"
    assert args[args.index("--prometheus-port") + 1] == "9103"
    assert p.endpoint == "http://127.0.0.1:9102" and router.ready_url == p.endpoint + "/health"
    assert not p.gateway and router.env == {}
    # The instances start together; the router once both answer.
    assert [x.after_ready for x in p.processes] == [False, False, True]


def test_plain_vllm_follows_the_user_and_the_machine() -> None:
    unpatched = plan("vllm-router", patch_plain_vllm=False, vllm_args=("--dtype", "bfloat16"))
    vllm = unpatched.processes[0]
    assert "PDSERVE_VLLM_PATCHES" not in vllm.env
    assert vllm.argv.count("--dtype") == 1 and vllm.argv[-2:] == ["--dtype", "bfloat16"]
    gpu = plan("vllm-router", cpu=False).processes[0]
    assert gpu.env == {} and "--dtype" not in gpu.argv and "--enforce-eager" not in gpu.argv
    four = plan("vllm-router", cores=(0, 1, 2, 3))
    assert [p.env["VLLM_CPU_OMP_THREADS_BIND"] for p in four.processes[:2]] == ["0,1", "2,3"]
    crowded = plan("vllm-router", instances=3)
    assert [p.env["VLLM_CPU_OMP_THREADS_BIND"] for p in crowded.processes[:3]] == ["nobind"] * 3
    own = plan("vllm-router", user_model="/my/model", model="/my/model", served_name=None)
    assert "--served-model-name" not in own.processes[0].argv


@pytest.mark.parametrize(
    ("name", "counts", "policy", "rescheduling"),
    [
        ("pdserve-rr", ["0", "0", "2"], "round-robin", "--no-rescheduling"),
        ("pdserve-1p1d", ["1", "1", "0"], "pd", "--no-rescheduling"),
        ("pdserve-1p1d-resched", ["1", "1", "0"], "pd", "--rescheduling"),
    ],
)
def test_pdserve_setups_are_pdserve_serve_command_lines(
    name: str, counts: list[str], policy: str, rescheduling: str
) -> None:
    p = plan(name, Path("/logs/x"), kv_cache_gib=3)
    (serve,) = p.processes
    assert serve.argv[1:4] == ["-m", "pdserve.cli", "serve"]
    args = serve.argv[4:]
    for flag, value in zip(("--prefill", "--decode", "--both"), counts, strict=True):
        assert args[args.index(flag) + 1] == value
    assert args[args.index("--policy") + 1] == policy and rescheduling in args
    assert args[args.index("--kv-cache-gib") + 1] == "3"
    assert args[args.index("--log-dir") + 1] == "/logs/x"
    assert "--model" not in args  # the bundled model is pdserve serve's default
    assert args[-2:] == ["--max-num-seqs", "8"]
    assert p.gateway and p.endpoint == "http://127.0.0.1:9100"
    assert serve.ready_url == p.endpoint + "/admin/instances" and serve.expect_instances == 2
    assert p.cores == ["0", "1"] and serve.env == {}
    # Every flag is one pdserve serve has; only the vLLM arguments are left over.
    parsed, extra = build_parser().parse_known_args(serve.argv[3:])
    assert extra == ["--max-num-seqs", "8"]
    assert parsed.control_port == 9101 and parsed.port == 9100
    assert parsed.rescheduling is (rescheduling == "--rescheduling")


def test_a_user_model_reaches_pdserve_serve() -> None:
    p = plan("pdserve-1p1d", user_model="/my/model", model="/my/model", served_name=None)
    args = p.processes[0].argv
    assert args[args.index("--model") + 1] == "/my/model"


def test_router_command_line_is_vllm_routers() -> None:
    launch_router = pytest.importorskip("vllm_router.launch_router")
    router = plan("vllm-router").processes[-1]
    parsed = launch_router.parse_router_args(router.argv[3:])
    assert parsed.worker_urls == ["http://127.0.0.1:9100", "http://127.0.0.1:9101"]
    assert parsed.policy == "round_robin" and parsed.port == 9102
    assert parsed.prometheus_port == 9103


def test_plain_vllm_command_line_is_vllms() -> None:
    cli_args = pytest.importorskip("vllm.entrypoints.launchers.cli_args")
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    vllm = plan("vllm-router").processes[0]
    parser = cli_args.make_arg_parser(FlexibleArgumentParser())
    parsed = parser.parse_args(vllm.argv[3:])
    assert parsed.dtype == "float32" and parsed.enforce_eager and parsed.max_num_seqs == 8
    assert parsed.port == 9100 and parsed.served_model_name == ["SmolLM2-135M-Instruct"]


def test_metric_total() -> None:
    text = "\n".join(
        [
            "# HELP vllm:num_preemptions_total Cumulative number of preemption.",
            "# TYPE vllm:num_preemptions_total counter",
            'vllm:num_preemptions_total{engine="0",model_name="m"} 3.0',
            'vllm:num_preemptions_total{engine="1",model_name="m"} 2.0',
            'vllm:num_preemptions_created{engine="0",model_name="m"} 1.7e9',
            'pdserve_migrations_total{result="started"} 5.0',
            'pdserve_migrations_total{result="completed"} 4.0',
            "process_open_fds 12",
        ]
    )
    assert metric_total(text, "vllm:num_preemptions_total") == 5.0
    assert metric_total(text, "vllm:num_preemptions_total", engine="1") == 2.0
    assert metric_total(text, "pdserve_migrations_total", result="completed") == 4.0
    assert metric_total(text, "process_open_fds") == 12.0
    assert metric_total(text, "pdserve_migrations_total", result="aborted") is None
    assert metric_total(text, "pdserve_dispatches_total") is None


# --- processes, with fake servers in place of vLLM and pdserve --------------------------


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _tiny_point(url: str, tmp_path: Path) -> tuple[RunSettings, list[BenchRequest]]:
    point = RunSettings(
        url=url,
        workload="fixed",
        input_len=4,
        output_len=3,
        num_requests=4,
        rate=[float("inf")],
        output_dir=str(tmp_path / "points"),
        progress=False,
        plots=False,
        time_limit_s=20,
    )
    return point, [BenchRequest([101, 102, 103, 104], 4, 3)] * 4


def test_vllm_router_setup_runs_and_stops_on_fake_instances(tmp_path: Path) -> None:
    pytest.importorskip("vllm_router")
    from pdserve.cluster.processes import free_port

    p = plan_setup(parse_setup("vllm-router", 2), launch(), tmp_path, free_port)
    for proc in p.processes[:2]:  # fakes in place of vLLM; the router is the real one
        proc.argv = [sys.executable, str(FAKES), str(proc.port)]
    running = RunningSetup(p, tmp_path)
    try:
        running.start(60)
        before = running.counters()
        point, requests = _tiny_point(running.endpoint, tmp_path)
        result = compare.measure_point(point, float("inf"), requests)
        assert result.summary.completed == 4, result.records[0].error
        after = running.counters()
        # Round robin: two requests per fake, so one preemption on each; 4 prompt tokens
        # each queried, half of them found.
        zero = {"preemptions": 0.0, "prefix_cache_queries": 0.0, "prefix_cache_hits": 0.0}
        assert before == zero
        assert after == {"preemptions": 2.0, "prefix_cache_queries": 16.0, "prefix_cache_hits": 8.0}
        running.check_alive()
    finally:
        running.stop()
    assert not running.processes
    assert not any(_listening(proc.port) for proc in p.processes)


def test_pdserve_setup_waits_for_its_instances_and_reads_gateway_counters(tmp_path: Path) -> None:
    from pdserve.cluster.processes import free_port

    p = plan_setup(parse_setup("pdserve-1p1d", 2), launch(), tmp_path, free_port)
    (serve,) = p.processes
    serve.argv = [sys.executable, str(FAKES), str(serve.port), "--gateway", "2"]
    running = RunningSetup(p, tmp_path)
    try:
        running.start(60)
        assert running.instance_urls == [p.endpoint, p.endpoint]
        point, requests = _tiny_point(running.endpoint, tmp_path)
        assert compare.measure_point(point, float("inf"), requests).summary.completed == 4
        assert running.counters() == {
            "preemptions": 4.0,  # the fake lists itself twice, 2 preemptions each
            "prefix_cache_queries": 32.0,  # 16 prompt tokens, counted twice
            "prefix_cache_hits": 16.0,
            "migrations": 1.0,
            "dispatch_disaggregated": 4.0,
            "dispatch_local": 0.0,
            "kv_received_bytes": 4000.0,
        }
    finally:
        running.stop()
    assert not _listening(serve.port)


def test_a_setup_that_dies_while_starting_fails_fast(tmp_path: Path) -> None:
    from pdserve.cluster.processes import free_port

    p = plan_setup(parse_setup("pdserve-rr", 2), launch(), tmp_path, free_port)
    p.processes[0].argv = [sys.executable, "-c", "import sys; print('no model'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match="exited with code 3"):
        compare.start_setup(p, tmp_path, 30)


# --- the sweep and the report -----------------------------------------------------------


class FakeRunning:
    def __init__(self, name: str, fake: Fake, events: list[str]) -> None:
        self._name, self.fake, self.events = name, fake, events

    @property
    def name(self) -> str:
        return self._name

    @property
    def endpoint(self) -> str:
        return self.fake.url

    def counters(self) -> dict[str, float]:
        return {"preemptions": float(self.fake.requests // 2)}

    def check_alive(self) -> None:
        pass

    def stop(self) -> None:
        self.events.append(f"stop {self.name}")


def compare_settings(tmp_path: Path, **extra: Any) -> CompareSettings:
    base: dict[str, Any] = {
        "workload": "fixed",
        "input_len": 8,
        "output_len": 5,
        "num_requests": 4,
        "rate": [50.0, 100.0],
        "slo_ttft_ms": 1000,
        "slo_tpot_ms": 1000,
        "output_dir": str(tmp_path / "out"),
        "log_dir": str(tmp_path / "logs"),
        "progress": False,
        "time_limit_s": 20,
        "warmup_requests": 2,
    }
    return CompareSettings(**(base | extra))


def run_comparison(
    tmp_path: Path, fake: Fake, events: list[str], failing: Sequence[str] = (), **extra: Any
) -> dict[str, Any]:
    settings = compare_settings(tmp_path, **extra)

    def start(p: SetupPlan, log_dir: Path, timeout_s: float) -> FakeRunning:
        events.append(f"start {p.spec.name}")
        if p.spec.name in failing:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {p.spec.name}")
        return FakeRunning(p.spec.name, fake, events)

    def measure(point: RunSettings, load: float, requests: Sequence[BenchRequest]) -> PointResult:
        events.append(f"point {point.label} {load:g}")
        return compare.measure_point(point, load, requests)

    def warm(point: RunSettings, requests: Sequence[BenchRequest], concurrency: int) -> int:
        events.append(f"warm {point.label}")
        return compare.warm_up(point, requests, concurrency)

    def vllm_bench(argv: list[str], result: Path, log: Path, timeout: float, env: Any) -> Any:
        events.append("vllm bench serve")
        assert argv[argv.index("--base-url") + 1] == fake.url
        return json.loads(FIXTURE.read_text())

    comparison = Comparison(
        settings,
        launch(vllm_args=("--max-num-seqs", "4")),
        "pdserve bench compare --workload fixed --rate 50 100",
        start=start,
        measure=measure,
        warm=warm,
        vllm_bench=vllm_bench,
        port=ports(),
    )
    return comparison.run()


def test_sweep_runs_each_setup_alone_in_order_and_writes_the_report(tmp_path: Path) -> None:
    events: list[str] = []
    with serve_in_thread() as fake:
        results = run_comparison(
            tmp_path, fake, events, cross_check=True, cross_check_setup="pdserve-rr", repetitions=1
        )
    expected = []
    for name in default_setups(2):
        expected += [f"start {name}", f"warm {name}", f"point {name} 50", f"point {name} 100"]
        expected += ["vllm bench serve"] if name == "pdserve-rr" else []
        expected.append(f"stop {name}")
    assert events == expected

    # Each load has its own prompts; every setup got the same ones; warm-ups were different.
    prompts = [json.dumps(p["prompt"]) for p in fake.payloads]
    per_setup = len(prompts) // 4
    assert per_setup == 2 + 4 + 4
    first = prompts[:per_setup]
    assert all(prompts[i * per_setup : (i + 1) * per_setup] == first for i in range(4))
    warmup, load50, load100 = set(first[:2]), set(first[2:6]), set(first[6:])
    assert not (warmup & load50) and not (load50 & load100)
    assert all(p["max_tokens"] == 5 for p in fake.payloads[2:6])

    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["setups"][0]["name"] == "vllm-router" and len(saved["setups"]) == 4
    for entry in saved["setups"]:
        assert entry["error"] is None and entry["warmup_ok"] == 2
        assert [p["load"] for p in entry["points"]] == [50.0, 100.0]
        for point in entry["points"]:
            assert point["summary"]["completed"] == 4
            assert point["counters"] == {"preemptions": 2.0}
            assert (out / point["file"]).is_file()
    assert sorted(f.name for f in (out / "points").iterdir())[:2] == [
        "pdserve-1p1d-poisson-100.json",
        "pdserve-1p1d-poisson-50.json",
    ]
    assert saved["machine"]["cpu_model"] and saved["machine"]["ram_gib"]
    assert set(saved["versions"]) >= {"pdserve", "vllm", "torch", "vllm-router"}
    assert saved["vllm_args"] == ["--max-num-seqs", "4"]
    for png in saved["plots"]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert set(saved["plots"]) == {
        "sweep.png", "itl_tpot.png", "latency_cdf-50.png", "latency_cdf-100.png"
    }  # fmt: skip
    # Two xPyD setups against two colocated ones at two loads.
    assert len(saved["targets"]["p99_itl"]) == 8 and len(saved["targets"]["goodput"]) == 4

    cross = saved["cross_check"]
    assert cross["setup"] == "pdserve-rr" and cross["rate"] == 50.0
    assert cross["pdserve_source"].startswith("the sweep's point")
    assert cross["vllm"]["ttft_ms"]["mean"] == pytest.approx(122.9)

    report = (out / "report.md").read_text()
    assert report == render_report(saved)
    assert "pdserve bench compare --workload fixed --rate 50 100" in report
    assert saved["machine"]["cpu_model"] in report and "## Versions" in report
    assert "| pdserve-1p1d | 50 | 4/4 |" in report
    assert "| pdserve-1p1d-resched | pdserve-rr | 100 |" in report
    assert "nowhere to migrate" in report  # 1P1D with rescheduling cannot migrate
    assert "## Cross-check with `vllm bench serve`" in report and "--dataset-name random" in report
    assert "![sweep.png](sweep.png)" in report
    assert "VLLM_CPU_OMP_THREADS_BIND=0" in report  # the plain instances' command lines


def test_a_setup_that_fails_is_reported_and_the_others_run(tmp_path: Path) -> None:
    events: list[str] = []
    with serve_in_thread() as fake:
        results = run_comparison(
            tmp_path, fake, events, failing=["pdserve-rr"], setups=["pdserve-rr", "pdserve-1p1d"],
            rate=[100.0], plots=False, warmup_requests=0, repetitions=1,
        )  # fmt: skip
    assert events == [
        "start pdserve-rr",
        "start pdserve-1p1d",
        "point pdserve-1p1d 100",
        "stop pdserve-1p1d",
    ]
    failed, ran = results["setups"]
    assert failed["error"].startswith("did not start: timed out") and failed["points"] == []
    assert ran["error"] is None and len(ran["points"]) == 1
    report = (tmp_path / "out" / "report.md").read_text()
    assert "**pdserve-rr failed:**" in report
    assert "| pdserve-rr | - | did not start" in report
    assert results["targets"]["p99_itl"] == []


# --- settings and command line ----------------------------------------------------------


def test_command_line_builds_compare_settings() -> None:
    argv = ["bench", "compare", "--setups", "vllm-router", "pdserve-1p1d", "--rate", "0.5", "1"]
    argv += ["--workload", "summarize", "--slo-ttft-ms", "3000", "--cross-check"]
    argv += ["--kv-cache-gib", "1", "--max-num-seqs", "16"]
    args, extra = build_parser().parse_known_args(argv)
    assert args.accepts_extra and extra == ["--max-num-seqs", "16"]
    settings = settings_from_args(args)
    assert settings.setup_names() == ["vllm-router", "pdserve-1p1d"]
    assert settings.rate == [0.5, 1.0] and settings.workload == "summarize"
    assert settings.kv_cache_gib == 1 and settings.slo_ttft_ms == 3000
    assert settings.cross_check_target() == ("vllm-router", 0.5)
    # What each setup decides is not a flag of compare.
    _, extra = build_parser().parse_known_args(["bench", "compare", "--label", "x"])
    assert extra == ["--label", "x"]


def test_settings_refuse_impossible_comparisons() -> None:
    with pytest.raises(ValidationError, match="X \\+ Y"):
        CompareSettings(setups=["pdserve-1p2d"])
    with pytest.raises(ValidationError, match="open loop"):
        CompareSettings(cross_check=True, arrival="closed")
    with pytest.raises(ValidationError, match="not among"):
        CompareSettings(cross_check=True, setups=["vllm-router"], cross_check_setup="pdserve-rr")
    with pytest.raises(ValidationError, match="twice"):
        CompareSettings(setups=["pdserve-rr", "pdserve-rr"])
    assert CompareSettings(instances=4).setup_names()[2] == "pdserve-2p2d"


# --- targets ----------------------------------------------------------------------------


def _summary(itl_p99: float, goodput: float, attainment: float) -> dict[str, Any]:
    empty = LatencyStats()
    return Summary(
        requests_sent=10, completed=10, failed=0, duration_s=10.0, total_input_tokens=0,
        total_output_tokens=0, request_throughput=1.0, output_throughput=1.0, ttft_ms=empty,
        tpot_ms=empty, itl_ms=LatencyStats(n=1, p99=itl_p99), e2e_ms=empty, slo_ttft_ms=100.0,
        goodput=goodput, slo_attainment=attainment,
    ).model_dump(mode="json")  # fmt: skip


def _entry(name: str, points: dict[float, dict[str, Any]]) -> dict[str, Any]:
    spec = parse_setup(name, 2)
    return {
        "name": name,
        "spec": {"prefill": spec.prefill, "decode": spec.decode, "both": spec.both},
        "points": [{"load": load, "summary": s} for load, s in points.items()],
    }


def test_targets_compare_xpyd_with_colocated_at_equal_rate_and_at_the_knee() -> None:
    colocated = _entry(
        "vllm-router",
        {
            1.0: _summary(400, 0.95, 0.95),
            2.0: _summary(800, 1.8, 0.9),
            3.0: _summary(900, 1.5, 0.5),
        },
    )
    xpyd = _entry(
        "pdserve-1p1d",
        {1.0: _summary(100, 1.0, 1.0), 2.0: _summary(500, 2.5, 0.95), 3.0: _summary(600, 2.7, 0.9)},
    )
    targets = evaluate_targets([colocated, xpyd])
    ratios = [(r["load"], r["ratio"], r["met"]) for r in targets["p99_itl"]]
    assert ratios == [(1.0, 0.25, True), (2.0, 0.625, False), (3.0, pytest.approx(2 / 3), False)]
    (goodput,) = targets["goodput"]
    assert goodput["knee"] == 2.0  # the highest rate with >= 90% attainment
    assert goodput["ratio"] == pytest.approx(2.5 / 1.8) and goodput["met"] is True
    assert goodput["peak_ratio"] == pytest.approx(2.7 / 1.8)
    assert knee_load({1.0: Summary.model_validate(_summary(1, 0.1, 0.2))}) == 1.0


# --- the cross-check --------------------------------------------------------------------


def test_vllm_bench_serve_json_is_read_with_its_field_names() -> None:
    data = json.loads(FIXTURE.read_text())
    parsed = parse_vllm_bench(data)
    assert parsed["completed"] == 3 and parsed["failed"] == 1
    assert parsed["duration_s"] == data["duration"]
    assert parsed["ttft_ms"] == {
        "mean": data["mean_ttft_ms"],
        "p50": data["p50_ttft_ms"],
        "p90": data["p90_ttft_ms"],
        "p99": data["p99_ttft_ms"],
    }
    assert parsed["tpot_ms"]["mean"] == data["mean_tpot_ms"]
    assert parsed["e2e_ms"]["p99"] == data["p99_e2el_ms"]
    assert parsed["mean_input_tokens"] == pytest.approx(97 / 3)
    assert parsed["goodput"] == data["request_goodput"]

    # vLLM's per-request timings through pdserve's formulas give vLLM's numbers back.
    records = records_from_vllm_bench(data)
    assert records is not None and [r.success for r in records] == [True, True, False, True]
    again = summarize(records, data["duration"])
    for ours, theirs in [
        (again.ttft_ms.mean, data["mean_ttft_ms"]),
        (again.ttft_ms.p99, data["p99_ttft_ms"]),
        (again.tpot_ms.mean, data["mean_tpot_ms"]),
        (again.tpot_ms.p50, data["median_tpot_ms"]),
        (again.itl_ms.p99, data["p99_itl_ms"]),
        (again.e2e_ms.mean, data["mean_e2el_ms"]),
    ]:
        assert ours == pytest.approx(theirs)
    undetailed = {k: v for k, v in data.items() if k not in ("ttfts", "itls", "errors")}
    assert records_from_vllm_bench(undetailed) is None


def test_cross_check_rows_give_relative_differences() -> None:
    data = json.loads(FIXTURE.read_text())
    theirs = parse_vllm_bench(data)
    records = records_from_vllm_bench(data)
    assert records is not None
    ours = summarize(records, data["duration"]).model_copy(
        update={
            "ttft_ms": LatencyStats(n=3, mean=110.0, p50=100.0, p99=150.0),
            "tpot_ms": LatencyStats(n=3, mean=21.0, p50=21.0, p99=22.0),
        }
    )
    rows = {r["metric"]: r for r in cross_check_rows(ours, theirs, 0.10, summarize(records, 2.0))}
    assert rows["TTFT mean"]["relative_difference"] == pytest.approx(122.9 / 110 - 1)
    assert rows["TTFT mean"]["within_tolerance"] is False and rows["TTFT mean"]["checked"]
    assert rows["TPOT mean"]["within_tolerance"] is True
    assert rows["TPOT mean"]["vllm_recomputed_ms"] == pytest.approx(data["mean_tpot_ms"])
    assert not rows["ITL P99"]["checked"]


def test_vllm_bench_serve_command_line(tmp_path: Path) -> None:
    settings = compare_settings(tmp_path, input_len=3000, output_len=64, max_context=2048)
    argv = vllm_bench_argv(
        settings, "http://127.0.0.1:8000", "SmolLM2-135M-Instruct", "/tok", 0.5, tmp_path,
        "v.json", cli=["vllm"],
    )  # fmt: skip
    joined = shlex.join(argv)
    assert joined.startswith("vllm bench serve --backend openai --base-url http://127.0.0.1:8000")
    # Lengths capped like pdserve's own fixed workload.
    assert "--random-input-len 2047 --random-output-len 1 --random-range-ratio 0" in joined
    assert "--num-prompts 4 --request-rate 0.5 --burstiness 1 --seed 0 --temperature 0" in joined
    assert "--save-detailed" in argv and "--ignore-eos" in argv
    assert argv[-3:] == ["--goodput", "ttft:1000", "tpot:1000"]


def test_vllm_bench_serve_command_line_is_vllms(tmp_path: Path) -> None:
    serve = pytest.importorskip("vllm.benchmarks.serve")
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    settings = compare_settings(tmp_path, input_len=512, output_len=32)
    argv = vllm_bench_argv(settings, "http://h:1", "m", "/tok", 0.25, tmp_path, "v.json", ["vllm"])
    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    parsed = parser.parse_args(argv[3:])
    assert parsed.dataset_name == "random" and parsed.random_input_len == 512
    assert parsed.random_output_len == 32 and parsed.num_prompts == 4
    assert parsed.request_rate == 0.25 and parsed.base_url == "http://h:1"
    assert parsed.save_detailed and parsed.result_filename == "v.json"
    assert parsed.goodput == ["ttft:1000", "tpot:1000"] and parsed.temperature == 0.0


def test_run_vllm_bench_reads_the_json_or_reports_the_failure(tmp_path: Path) -> None:
    result = tmp_path / "v.json"
    copy = f"import shutil; shutil.copy({str(FIXTURE)!r}, {str(result)!r})"
    data = run_vllm_bench([sys.executable, "-c", copy], result, tmp_path / "log", 30, {})
    assert data["completed"] == 3
    fail = "import sys; print('ValueError: Unknown backend'); sys.exit(1)"
    with pytest.raises(RuntimeError, match="Unknown backend"):
        run_vllm_bench(
            [sys.executable, "-c", fail], tmp_path / "no.json", tmp_path / "log2", 30, {}
        )
    with pytest.raises(TimeoutError):
        run_vllm_bench(
            [sys.executable, "-c", "import time; time.sleep(30)"], result, tmp_path / "l3", 0.5, {}
        )


def test_the_build_is_read_from_metadata() -> None:
    from pdserve.instance.environment import is_cpu_build
    from pdserve.protocol.net import available_cores

    assert isinstance(is_cpu_build(), bool)
    assert available_cores()


def test_committed_results_read_back_into_the_models_unchanged() -> None:
    """results.json written before the typed models reads into them and is written again
    byte for byte; its report.md is rendered again from it."""
    text = (COMMITTED / "results.json").read_text()
    results = CompareResults.model_validate_json(text)
    assert results.version == 1 and results.settings.repetitions == 1  # one pass
    assert results.repeated is None and "## Ratios over" not in render_report(results)
    assert json.dumps(results.to_json(), indent=1) == text.rstrip("\n")
    assert render_report(results) == (COMMITTED / "report.md").read_text()


# --- repetitions: rotation, seeds, median / spread / tie, the report ---------------------


def test_rotation_starts_each_repetition_one_setup_later() -> None:
    names = ["A", "B", "C"]
    orders = [compare.rotation(names, r) for r in range(4)]
    assert orders == [["A", "B", "C"], ["B", "C", "A"], ["C", "A", "B"], ["A", "B", "C"]]
    assert compare.rotation(["A"], 5) == ["A"] and compare.rotation([], 1) == []


def test_seeds_keep_version_1s_first_pass_and_are_fresh_after(tmp_path: Path) -> None:
    settings = compare_settings(tmp_path, mixes=["a:rate=1/2/3", "b:rate=1"], repetitions=2)
    bases = [compare.seed_base(settings, r, m) for r in range(2) for m in range(2)]
    assert bases == [0, 5, 10, 15]  # stride: the most loads of a mix (3) + cross-check + warm-up
    one = compare_settings(tmp_path, repetitions=1, seed=7)
    assert compare.seed_base(one, 0, 0) == 7


def test_mixes_parse_and_bad_ones_are_refused(tmp_path: Path) -> None:
    settings = compare_settings(
        tmp_path, mixes=["pre:input_len=384,output_len=8,rate=0.5/1", "dec:workload=generate"]
    )
    pre, dec = settings.mix_list()
    assert (pre.name, pre.settings.input_len, pre.settings.rate) == ("pre", 384, [0.5, 1.0])
    assert (dec.settings.workload, dec.settings.rate) == ("generate", [50.0, 100.0])
    assert settings.few_for_p99() == ["pre", "dec"] and len(compare.warn_about(settings)) == 1
    for bad, message in [
        (["x:seed=3"], "key=value"),
        (["x:rate"], "key=value"),
        (["a b:rate=1"], "NAME"),
        (["x:rate=1", "x:rate=2"], "twice"),
    ]:
        with pytest.raises(ValidationError, match=message):
            compare_settings(tmp_path, mixes=bad)
    with pytest.raises(ValidationError, match="not with --mixes"):
        compare_settings(tmp_path, mixes=["x:rate=1"], cross_check=True)
    with pytest.raises(ValidationError, match="--candidate"):
        compare_settings(tmp_path, candidate="sglang")
    args, _ = build_parser().parse_known_args(
        ["bench", "compare", "--mixes", "a:rate=1", "b:rate=2", "--repetitions", "4"]
    )
    parsed = settings_from_args(args)
    assert parsed.mixes == ["a:rate=1", "b:rate=2"] and parsed.repetitions == 4


def test_policy_setups_are_both_instances_under_that_policy() -> None:
    spec = parse_setup("pdserve-least-requests-resched", 2)
    assert (spec.both, spec.policy, spec.rescheduling) == (2, "least-requests", True)
    assert "live rescheduling" in spec.describe()
    args = plan("pdserve-least-requests").processes[0].argv
    assert args[args.index("--policy") + 1] == "least-requests" and "--no-rescheduling" in args
    with pytest.raises(ValueError, match="POLICY one of pd, round-robin"):
        parse_setup("pdserve-fastest", 2)


def test_interleaved_repetitions_rotate_restart_and_give_fresh_prompts(tmp_path: Path) -> None:
    events: list[str] = []
    names = ["pdserve-rr", "pdserve-1p1d", "vllm-router"]
    with serve_in_thread() as fake:
        run_comparison(
            tmp_path, fake, events, setups=names, rate=[100.0], warmup_requests=1,
            mixes=["short:input_len=4,output_len=2", "long:input_len=16,output_len=3"],
            plots=False,
        )  # fmt: skip
    starts = [e.split()[1] for e in events if e.startswith("start")]
    assert starts == [*names, *names[1:], names[0], names[2], *names[:2]]
    # Per start: one warm-up, every mix, then the stop.
    a = names[0]
    assert events[:5] == [
        f"start {a}", f"warm {a}", f"point {a}-short-r1 100", f"point {a}-long-r1 100",
        f"stop {a}",
    ]  # fmt: skip
    # Per start: 1 warm-up + 4 + 4 requests. Same prompts within a repetition, fresh across.
    prompts = [json.dumps(p["prompt"]) for p in fake.payloads]
    # Each mix's requests sorted: 10 ms apart, they may reach the fake server in any order.
    starts_prompts = [prompts[i * 9 : (i + 1) * 9] for i in range(9)]
    per_start = [[*p[:1], *sorted(p[1:5]), *sorted(p[5:])] for p in starts_prompts]
    for rep in range(3):
        first, *others = per_start[rep * 3 : rep * 3 + 3]
        assert all(o == first for o in others)
    assert not set(per_start[0][1:]) & set(per_start[3][1:])
    assert not set(per_start[0][1:5]) & set(per_start[0][5:])  # each mix its own prompts

    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["version"] == 2 and len(saved["setups"]) == 3 * 3 * 2
    assert {(e["repetition"], e["mix"]) for e in saved["setups"]} == {
        (r, m) for r in (1, 2, 3) for m in ("short", "long")
    }
    assert (tmp_path / "out" / "points" / "pdserve-1p1d-long-r2-poisson-100.json").is_file()
    rows = saved["repeated"]
    knee = [r for r in rows if r["metric"] == "goodput at knee" and r["mix"] == "short"]
    assert [r["baseline"] for r in knee] == ["pdserve-1p1d", "vllm-router", "best of the others"]
    assert all(len(r["ratios"]) == 3 for r in rows) and rows[0]["setup"] == "pdserve-rr"
    ttft = next(r for r in rows if r["metric"] == "TTFT P99")
    assert ttft["min_requests"] <= 4 and ttft["outcome"] in ("tie", "too few requests")
    # Targets per repetition: 1P1D against the two colocated setups, in each (mix, rep).
    assert len(saved["targets"]["goodput"]) == 2 * 3 * 2
    report = (tmp_path / "out" / "report.md").read_text()
    assert report == render_report(CompareResults.model_validate(saved))
    assert "## Ratios over 3 repetitions: pdserve-rr / baseline" in report
    assert "| pdserve-1p1d (mix long, rep 3) | 100 | 4/4 |" in report
    assert "order rotated" in report and "- mix **long**:" in report


def _rep_summary(goodput: float, ttft_p99: float, completed: int, attain: float = 1.0) -> Summary:
    empty = LatencyStats()
    return Summary(
        requests_sent=completed, completed=completed, failed=0, duration_s=10.0,
        total_input_tokens=0, total_output_tokens=0, request_throughput=1.0,
        output_throughput=1.0, ttft_ms=LatencyStats(n=completed, mean=ttft_p99 / 2, p99=ttft_p99),
        tpot_ms=empty, itl_ms=empty, e2e_ms=empty, slo_ttft_ms=100.0, goodput=goodput,
        slo_attainment=attain,
    )  # fmt: skip


def _rep_entry(name: str, rep: int, goodput: float, ttft_p99: float, completed: int = 200) -> Any:
    spec = parse_setup(name, 2)
    return compare.SetupResult(
        name=name,
        repetition=rep,
        spec={"prefill": spec.prefill, "decode": spec.decode, "both": spec.both},
        points=[{"load": 1.0, "summary": _rep_summary(goodput, ttft_p99, completed)}],
    )


def test_median_spread_and_the_tie_rule() -> None:
    Outcome = compare.Outcome
    assert compare.median_spread([1.3, None, 1.1, 1.2]) == (1.2, 1.1, 1.3)
    assert compare.median_spread([None]) == (None, None, None)
    rule = compare.ratio_outcome
    assert rule([1.3, 1.2, 1.4], "higher", None, p99=False) is Outcome.BETTER
    assert rule([1.3, 0.9, 1.4], "higher", None, p99=False) is Outcome.TIE
    assert rule([0.8, 1.0, 0.7], "lower", 500, p99=True) is Outcome.TIE  # 1.0 is in the spread
    assert rule([0.8, 0.9, 0.7], "lower", 500, p99=True) is Outcome.BETTER
    assert rule([0.8, 0.9, 0.7], "higher", None, p99=False) is Outcome.WORSE
    # Every setup served the offered load: 1.002-1.008 is no win, 0.97 is a loss.
    assert rule([1.002, 1.008, 1.004], "higher", None, p99=False) is Outcome.TIE
    assert rule([0.995, 0.998, 0.999], "higher", None, p99=False) is Outcome.TIE
    assert rule([0.97, 0.99, 0.99], "higher", None, p99=False) is Outcome.WORSE
    assert rule([0.8, 0.9, 0.7], "lower", 99, p99=True) is Outcome.TOO_FEW_REQUESTS
    assert rule([0.8, 0.9, 0.7], "lower", 99, p99=False) is Outcome.BETTER  # not a P99
    assert rule([1.3, None, 1.4], "higher", None, p99=False) is Outcome.TOO_FEW_REPETITIONS
    assert rule([None, None], "higher", None, p99=False) is Outcome.UNMEASURED
    assert Outcome.TIE == "tie"  # an enum, written to results.json as its value


def test_repeated_ratios_per_baseline_and_against_the_best() -> None:
    # Candidate's goodput 1.3, 1.25, 1.4 x the router's; 0.9, 1.2, 1.1 x 1P1D's: a tie.
    goodputs = {
        "pdserve-rr": [1.3, 1.25, 1.4],
        "vllm-router": [1.0, 1.0, 1.0],
        "pdserve-1p1d": [1.3 / 0.9, 1.25 / 1.2, 1.4 / 1.1],
    }
    setups = [
        _rep_entry(name, rep + 1, values[rep], 100.0 if name == "pdserve-rr" else 200.0)
        for rep in range(3)
        for name, values in goodputs.items()
    ]
    setups[-1] = _rep_entry("pdserve-1p1d", 3, goodputs["pdserve-1p1d"][2], 200.0, completed=50)
    rows = {(r.metric, r.baseline): r for r in compare.repeated_ratios(setups, "pdserve-rr")}
    router = rows[("goodput at knee", "vllm-router")]
    assert router.ratios == pytest.approx([1.3, 1.25, 1.4]) and router.median == pytest.approx(1.3)
    assert (router.low, router.high) == (pytest.approx(1.25), pytest.approx(1.4))
    assert router.outcome is compare.Outcome.BETTER and router.load is None
    assert rows[("goodput at knee", "pdserve-1p1d")].outcome is compare.Outcome.TIE
    best = rows[("goodput at knee", "best of the others")]
    assert best.ratios == pytest.approx([0.9, 1.2, 1.1]) and best.outcome is compare.Outcome.TIE
    assert rows[("TTFT P99", "vllm-router")].outcome is compare.Outcome.BETTER
    few = rows[("TTFT P99", "pdserve-1p1d")]
    assert few.min_requests == 50 and few.outcome is compare.Outcome.TOO_FEW_REQUESTS
    assert rows[("TTFT mean", "pdserve-1p1d")].outcome is compare.Outcome.BETTER
    # A setup that failed in one repetition leaves that repetition out of its ratios.
    setups[1] = setups[1].model_copy(update={"error": "did not start", "points": []})
    again = {(r.metric, r.baseline): r for r in compare.repeated_ratios(setups, "pdserve-rr")}
    gone = again[("goodput at knee", "vllm-router")]
    assert gone.ratios[0] is None and gone.outcome is compare.Outcome.TOO_FEW_REPETITIONS
    assert not any(
        "goodput" in m
        for m, _ in {
            (r.metric, r.baseline) for r in compare.repeated_ratios(setups, "pdserve-rr", False)
        }
    )


def test_report_shows_median_spread_and_outcome(tmp_path: Path) -> None:
    setups = [
        _rep_entry(name, rep, goodput, 100.0)
        for rep, (a, b) in enumerate([(1.3, 1.0), (1.2, 1.0), (1.5, 1.0)], start=1)
        for name, goodput in (("pdserve-rr", a), ("vllm-router", b))
    ]
    results = CompareResults(
        command="pdserve bench compare", started_at="t", instances=2,
        machine=compare.machine_info(), versions={}, settings=compare_settings(tmp_path),
        vllm_args=[], model={"loaded": "m", "served_name": None}, log_dir="/logs",
        setups=setups, repeated=compare.repeated_ratios(setups, "pdserve-rr"),
    )  # fmt: skip
    report = render_report(results)
    assert (
        "| - | goodput at knee | vllm-router | knee | higher | 1.30 | 1.20-1.50 "
        "| 1.30 / 1.20 / 1.50 | - | **better** |" in report
    )
    assert "| peak goodput | vllm-router | sweep |" in report
    assert "| - | TTFT P99 | vllm-router | 1 | lower | 1.00 | 1.00-1.00" in report
    assert "| 200 | tie |" in report
    assert "| pdserve-rr (rep 2) | 1 | 200/200 |" in report
    assert json.loads(json.dumps(results.to_json()))["repeated"][0]["outcome"] == "better"


def test_an_slo_aware_policy_gets_the_comparisons_slos(tmp_path: Path) -> None:
    from benchmark.setups import SetupSpec, slo_args

    settings = compare_settings(tmp_path, slo_ttft_ms=6000, slo_tpot_ms=150)
    adaptive = SetupSpec("pdserve-adaptive", "pdserve", both=2, policy="adaptive")
    assert slo_args(adaptive, settings) == ["--slo-ttft-ms", "6000", "--slo-tpot-ms", "150"]
    assert slo_args(parse_setup("pdserve-1p1d", 2), settings) == []
    assert slo_args(adaptive, SetupSettings()) == []  # no SLO known: none passed
