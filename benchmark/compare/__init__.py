"""``pdserve bench compare``: one workload and one load sweep against several serving setups.

Each setup (``benchmark.setups``: N plain vLLM instances behind ``vllm-router``, pdserve with
N colocated instances and a round-robin policy, pdserve xPyD, pdserve xPyD with live
rescheduling) is started alone, warmed up, measured at every load of the sweep with
``pdserve bench run``'s client and metrics, and stopped before the next one starts: two setups
never share the machine. The output directory then holds

* ``report.md``: machine, versions, settings, the command line, one table row per setup and
  load, the targets of the issue (P99 ITL and goodput of xPyD against colocated) as measured,
  and the cross-check;
* ``results.json``: the same, machine-readable;
* ``points/<setup>-<arrival>-<load>.json``: every request's record (``bench run``'s format);
* PNG figures: latency and goodput against load, P99 ITL and TPOT against load, CDFs per load.

Every setup receives the same requests at a given load point. Each load point has its own
prompts (seed + point index): a vLLM instance caches prefixes, so a prompt sent again at the
next load would find its KV cache already computed.

``--repetitions R`` (default 3) interleaves the setups: R passes, the order rotated each time
(A B C, B C A, C A B), every setup started fresh in each, and every (repetition, mix, load)
with prompts of its own. ``--mixes`` measures several workloads per start. Every ratio of the
candidate (``--candidate``, default the first setup) to every other setup is computed per
repetition and reported as median and spread (min-max) with an ``Outcome``: a spread that
crosses 1.0, or lies within 2% of it, is a tie; no P99 claim from under 100 requests per point (``spread``).

``--cross-check`` runs vLLM's own ``vllm bench serve`` (random dataset with the fixed
``--input-len``/``--output-len``, Poisson arrivals) against one setup at one rate and puts its
TTFT/TPOT next to pdserve's client's, with the measurement differences explained.

Arguments pdserve does not know go to every vLLM instance of every setup, as with
``pdserve serve``.

The package: ``settings`` (``CompareSettings`` and its flags), ``models`` (results.json as
typed models), ``environment`` (machine, versions, git commit), ``measure`` (starting a setup,
one load point), ``crosscheck`` (``vllm bench serve``), ``targets``, ``report`` (report.md),
``figures`` (PNGs), ``spread`` (ratios over repetitions) and ``runner`` (``Comparison``,
``main``).
"""

# Re-exports for the callers (the cli, tests): they repeat runner's imports by name.
from benchmark.compare.crosscheck import (
    CROSS_METRICS,
    cross_check_lengths,
    cross_check_rows,
    parse_vllm_bench,
    records_from_vllm_bench,
    run_vllm_bench,
    vllm_bench_argv,
    vllm_cli,
)
from benchmark.compare.environment import (
    command_line,
    git_commit,
    machine_info,
    software_versions,
)
from benchmark.compare.figures import draw_plots
from benchmark.compare.measure import (
    Running,
    measure_point,
    point_settings,
    start_setup,
    warm_up,
)
from benchmark.compare.models import (
    CompareResults,
    CrossCheck,
    CrossRow,
    GoodputTarget,
    ItlTarget,
    Machine,
    Outcome,
    PointEntry,
    RatioSpread,
    SetupResult,
    Targets,
    VllmBenchResult,
)
from benchmark.compare.report import render_report, results_table
from benchmark.compare.runner import (
    BENCH,
    Comparison,
    main,
    make_launch,
    planned_s,
    rotation,
    seed_base,
)
from benchmark.compare.settings import (
    MIN_P99_REQUESTS,
    MIN_REPETITIONS,
    CompareSettings,
    Mix,
    add_compare_arguments,
    parse_mix,
    settings_from_args,
    warn_about,
)
from benchmark.compare.spread import (
    BEST_BASELINE,
    median_spread,
    ratio_outcome,
    repeated_ratios,
)
from benchmark.compare.targets import (
    GOODPUT_TARGET,
    ITL_TARGET,
    KNEE_ATTAINMENT,
    evaluate_targets,
    knee_load,
)

__all__ = [
    "BENCH",
    "BEST_BASELINE",
    "CROSS_METRICS",
    "GOODPUT_TARGET",
    "ITL_TARGET",
    "KNEE_ATTAINMENT",
    "MIN_P99_REQUESTS",
    "MIN_REPETITIONS",
    "CompareResults",
    "CompareSettings",
    "Comparison",
    "CrossCheck",
    "CrossRow",
    "GoodputTarget",
    "ItlTarget",
    "Machine",
    "Mix",
    "Outcome",
    "PointEntry",
    "RatioSpread",
    "Running",
    "SetupResult",
    "Targets",
    "VllmBenchResult",
    "add_compare_arguments",
    "command_line",
    "cross_check_lengths",
    "cross_check_rows",
    "draw_plots",
    "evaluate_targets",
    "git_commit",
    "knee_load",
    "machine_info",
    "main",
    "make_launch",
    "measure_point",
    "median_spread",
    "parse_mix",
    "parse_vllm_bench",
    "planned_s",
    "point_settings",
    "ratio_outcome",
    "records_from_vllm_bench",
    "render_report",
    "repeated_ratios",
    "results_table",
    "rotation",
    "run_vllm_bench",
    "seed_base",
    "settings_from_args",
    "software_versions",
    "start_setup",
    "vllm_bench_argv",
    "vllm_cli",
    "warm_up",
    "warn_about",
]
