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

``--cross-check`` runs vLLM's own ``vllm bench serve`` (random dataset with the fixed
``--input-len``/``--output-len``, Poisson arrivals) against one setup at one rate and puts its
TTFT/TPOT next to pdserve's client's, with the measurement differences explained.

Arguments pdserve does not know go to every vLLM instance of every setup, as with
``pdserve serve``.

The package: ``settings`` (``CompareSettings`` and its flags), ``models`` (results.json as
typed models), ``environment`` (machine, versions, git commit), ``measure`` (starting a setup,
one load point), ``crosscheck`` (``vllm bench serve``), ``targets``, ``report`` (report.md),
``figures`` (PNGs) and ``runner`` (``Comparison``, ``main``).
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
    PointEntry,
    SetupResult,
    Targets,
    VllmBenchResult,
)
from benchmark.compare.report import render_report, results_table
from benchmark.compare.runner import BENCH, Comparison, main, make_launch
from benchmark.compare.settings import (
    CompareSettings,
    add_compare_arguments,
    settings_from_args,
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
    "CROSS_METRICS",
    "GOODPUT_TARGET",
    "ITL_TARGET",
    "KNEE_ATTAINMENT",
    "CompareResults",
    "CompareSettings",
    "Comparison",
    "CrossCheck",
    "CrossRow",
    "GoodputTarget",
    "ItlTarget",
    "Machine",
    "PointEntry",
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
    "parse_vllm_bench",
    "point_settings",
    "records_from_vllm_bench",
    "render_report",
    "results_table",
    "run_vllm_bench",
    "settings_from_args",
    "software_versions",
    "start_setup",
    "vllm_bench_argv",
    "vllm_cli",
    "warm_up",
]
