"""The typed results of ``pdserve bench compare``: results.json, part by part.

Field names and their order are results.json's keys, so a results.json written before these
models existed (those committed under ``benchmark/results/``) reads back into them and is
written again unchanged. Such a file is version 1 (it has no ``version`` key): one pass over
the setups. Version 2 adds repetitions and mixes: one ``SetupResult`` per setup, repetition
and mix (``repetition``, ``mix``), targets per repetition, and ``repeated``, every ratio's
median and spread over the repetitions; the fields it adds are absent from a version 1 file,
so the same code reads and renders both. Like the dicts they replace, the models also read by key
(``entry["points"]``), which is how tests and notebooks look into results.json's content.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
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
        return self._written(data)

    def _written(self, data: dict[str, Any]) -> dict[str, Any]:
        """What a part changes in its dump after the Nones are left out (nothing by default)."""
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
    # Written out only when on, so that results made before it existed read back alike.
    priorities: bool = Field(False, exclude_if=lambda v: v is False)


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
    """One setup (in one repetition and mix): how it was started, whether it ran, its load
    points."""

    omit_if_none: ClassVar[tuple[str, ...]] = ("repetition", "mix")

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
    repetition: int | None = Field(None, description="1, 2, ...; None: version 1, one pass")
    mix: str | None = Field(None, description="the workload mix; None: the only one")

    def summaries(self) -> dict[float, Summary]:
        return {p.load: p.summary for p in self.points}

    def label(self) -> str:
        """The name, with the mix and repetition where there are several."""
        return self.name + where(self.mix, self.repetition)


def where(mix: str | None, repetition: int | None) -> str:
    """`` (mix M, rep R)``, or the part of it that applies, or '' (version 1)."""
    parts = [f"mix {mix}"] if mix else []
    parts += [f"rep {repetition}"] if repetition is not None else []
    return f" ({', '.join(parts)})" if parts else ""


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

    omit_if_none: ClassVar[tuple[str, ...]] = ("repetition", "mix")

    setup: str
    baseline: str
    load: float
    p99_itl_ms: float | None
    baseline_p99_itl_ms: float | None
    ratio: float | None
    met: bool | None
    repetition: int | None = None
    mix: str | None = None


class GoodputTarget(ResultModel):
    """Goodput of an xPyD setup against a colocated baseline at the baseline's knee."""

    omit_if_none: ClassVar[tuple[str, ...]] = ("repetition", "mix")

    setup: str
    baseline: str
    knee: float | None
    goodput: float | None
    baseline_goodput: float | None
    ratio: float | None
    met: bool | None
    peak_ratio: float | None = Field(description="best goodput of each over the whole sweep")
    repetition: int | None = None
    mix: str | None = None


class Targets(ResultModel):
    p99_itl: list[ItlTarget] = Field(default_factory=list)
    goodput: list[GoodputTarget] = Field(default_factory=list)


class Outcome(enum.StrEnum):
    """What a ratio's spread over the repetitions allows one to say."""

    BETTER = "better"  # every repetition's ratio on the candidate's good side of 1.0
    WORSE = "worse"  # every one on the bad side
    TIE = "tie"  # the spread (min-max) crosses 1.0 or lies within TIE_MARGIN of it
    TOO_FEW_REQUESTS = "too few requests"  # a P99 from under MIN_P99_REQUESTS requests
    TOO_FEW_REPETITIONS = "too few repetitions"  # under MIN_REPETITIONS ratios measured
    UNMEASURED = "unmeasured"  # no repetition gave a ratio


class RatioSpread(ResultModel):
    """One ratio (candidate / baseline) over the repetitions: median, spread, outcome."""

    omit_if_none: ClassVar[tuple[str, ...]] = ("mix",)

    mix: str | None = None
    metric: str = Field(description="goodput at knee, peak goodput, TTFT mean, TTFT P99, ...")
    setup: str = Field(description="the candidate")
    baseline: str = Field(description="a setup, or BEST_BASELINE: the best of the others")
    load: float | None = Field(description="None: at the baseline's knee in each repetition")
    better: Literal["higher", "lower"] = Field(description="which side of 1.0 is a win")
    ratios: list[float | None] = Field(description="per repetition, in order")
    median: float | None
    low: float | None
    high: float | None
    min_requests: int | None = Field(description="fewest completed requests of a point used")
    outcome: Outcome


RESULTS_VERSION = 2
# Settings a version 1 results.json did not have: left out when one is written back.
V2_SETTINGS = ("repetitions", "mixes", "candidate")


class CompareResults(ResultModel):
    """results.json."""

    omit_if_none: ClassVar[tuple[str, ...]] = ("load_average_end", "repeated")

    version: int = Field(RESULTS_VERSION, description="1: written before repetitions")
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
    repeated: list[RatioSpread] | None = None

    @model_validator(mode="before")
    @classmethod
    def _version_1(cls, data: Any) -> Any:
        """A file without ``version`` whose settings have no ``repetitions`` is version 1:
        one pass, so one repetition (a new run passes its settings as a model: version 2)."""
        if not isinstance(data, dict) or "version" in data:
            return data
        settings = data.get("settings")
        if isinstance(settings, dict) and "repetitions" not in settings:
            data = data | {"version": 1, "settings": {"repetitions": 1} | settings}
        return data

    def _written(self, data: dict[str, Any]) -> dict[str, Any]:
        """Version 1 is written back as it was read: no version key, no new settings."""
        if self.version == 1:
            data.pop("version", None)
            for key in V2_SETTINGS:
                data["settings"].pop(key, None)
        return data

    def to_json(self) -> dict[str, Any]:
        """results.json's content (``Infinity`` for an infinite rate, as ``json`` writes it)."""
        return self.model_dump(mode="json")
