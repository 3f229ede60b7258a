"""The typed results of ``pdserve bench compare``: results.json, part by part.

Field names and their order are results.json's keys, so a results.json written before these
models existed (those committed under ``benchmark/results/``) reads back into them and is
written again unchanged. Like the dicts they replace, the models also read by key
(``entry["points"]``), which is how tests and notebooks look into results.json's content.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer
from typing_extensions import TypedDict

from benchmark.compare.settings import CompareSettings
from pdserve.workload.metrics import Summary


class ResultModel(BaseModel):
    """A part of results.json. Fields named in ``omit_if_none`` are left out while they are
    None: results.json has never had them then."""

    model_config = ConfigDict(extra="forbid")
    omit_if_none: ClassVar[tuple[str, ...]] = ()

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    @model_serializer(mode="wrap")
    def _leave_out_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in self.omit_if_none:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class Machine(ResultModel):
    cpu_model: str
    logical_cpus: int | None
    usable_cpus: list[int]
    ram_gib: float | None
    os: str
    python: str
    load_average: list[float] = Field(description="1, 5, 15 minutes; [] where unknown")


class ModelInfo(ResultModel):
    loaded: str = Field(description="what vLLM loads")
    served_name: str | None = Field(description="the name it serves under (None: loaded)")


class ProcessEntry(ResultModel):
    """A process of a setup as it was started (ports are picked at run time)."""

    name: str
    argv: list[str]
    env: dict[str, str] = Field(description="on top of the benchmark's environment")


class SpecEntry(ResultModel):
    """``benchmark.setups.SetupSpec`` as results.json records it."""

    name: str = ""
    kind: str = "pdserve"
    prefill: int = 0
    decode: int = 0
    both: int = 0
    policy: str = "pd"
    rescheduling: bool = False


class PointEntry(ResultModel):
    """One load point of one setup; its requests are in ``file``."""

    load: float
    file: str = Field("", description="the point's JSON, relative to the output directory")
    timed_out: bool = False
    summary: Summary
    counters: dict[str, float] = Field(
        default_factory=dict, description="differences over the point (preemptions, ...)"
    )


class SetupResult(ResultModel):
    """One setup: how it was started, whether it ran, its load points."""

    name: str
    description: str = ""
    endpoint: str = ""
    cores: list[str] = Field(default_factory=list, description="per instance, in start order")
    processes: list[ProcessEntry] = Field(default_factory=list)
    spec: SpecEntry = Field(default_factory=SpecEntry)
    error: str | None = None
    start_s: float | None = Field(None, description="seconds until it was ready")
    warmup_ok: int | None = Field(None, description="warm-up requests that succeeded")
    points: list[PointEntry] = Field(default_factory=list)

    def summaries(self) -> dict[float, Summary]:
        return {p.load: p.summary for p in self.points}


class PercentileStats(TypedDict):
    """A latency of ``vllm bench serve``, in ms (None where it did not report it)."""

    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


class VllmBenchResult(ResultModel):
    """The numbers of a ``vllm bench serve --save-result`` JSON, in ``Summary``'s terms."""

    completed: int
    failed: int
    duration_s: float | None
    request_throughput: float | None
    output_throughput: float | None
    goodput: float | None
    mean_input_tokens: float | None = Field(description="as the server counted them")
    mean_output_tokens: float | None
    ttft_ms: PercentileStats
    tpot_ms: PercentileStats
    itl_ms: PercentileStats
    e2e_ms: PercentileStats


class CrossRow(ResultModel):
    """One metric of the cross-check: pdserve's client against ``vllm bench serve``."""

    metric: str
    pdserve_ms: float | None
    vllm_ms: float | None
    vllm_recomputed_ms: float | None = Field(description="vLLM's timings, pdserve's formulas")
    relative_difference: float | None = Field(description="(vllm - pdserve) / pdserve")
    checked: bool = Field(description="one of the metrics held to the tolerance")
    within_tolerance: bool | None


class CrossCheck(ResultModel):
    """``vllm bench serve`` against one setup at one rate, next to pdserve's client."""

    omit_if_none: ClassVar[tuple[str, ...]] = ("vllm", "rows", "agree")

    setup: str
    rate: float
    num_requests: int
    input_len: int
    output_len: int
    tolerance: float
    error: str | None = None
    pdserve_source: str = Field(description="which run of pdserve's client is compared")
    pdserve: Summary
    argv: list[str] = Field(description="vllm bench serve's command line")
    vllm: VllmBenchResult | None = None  # None: it failed (error)
    rows: list[CrossRow] | None = None
    agree: bool | None = None


class ItlTarget(ResultModel):
    """P99 ITL of an xPyD setup against a colocated baseline at one rate."""

    setup: str
    baseline: str
    load: float
    p99_itl_ms: float | None
    baseline_p99_itl_ms: float | None
    ratio: float | None
    met: bool | None


class GoodputTarget(ResultModel):
    """Goodput of an xPyD setup against a colocated baseline at the baseline's knee."""

    setup: str
    baseline: str
    knee: float | None
    goodput: float | None
    baseline_goodput: float | None
    ratio: float | None
    met: bool | None
    peak_ratio: float | None = Field(description="best goodput of each over the whole sweep")


class Targets(ResultModel):
    p99_itl: list[ItlTarget] = Field(default_factory=list)
    goodput: list[GoodputTarget] = Field(default_factory=list)


class CompareResults(ResultModel):
    """results.json."""

    omit_if_none: ClassVar[tuple[str, ...]] = ("load_average_end",)

    command: str
    started_at: str
    finished_at: str | None = None
    instances: int
    machine: Machine
    versions: dict[str, str | None]
    settings: CompareSettings
    vllm_args: list[str]
    model: ModelInfo
    log_dir: str
    setups: list[SetupResult] = Field(default_factory=list)
    cross_check: CrossCheck | None = None
    targets: Targets = Field(default_factory=Targets)
    plots: list[str] = Field(default_factory=list)
    load_average_end: list[float] | None = None

    def to_json(self) -> dict[str, Any]:
        """results.json's content (``Infinity`` for an infinite rate, as ``json`` writes it)."""
        return self.model_dump(mode="json")
