"""``pdserve bench compare``'s settings: ``bench run``'s (workload, arrivals, SLOs), the setups'
(how every setup is started) and the comparison's own, and the flags made from them."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from pydantic import ConfigDict, Field, model_validator

from benchmark.run import LIST_FIELDS, RunSettings, add_run_arguments
from benchmark.setups import (
    PDSERVE_RR,
    ROUTER,
    SetupSettings,
    default_setups,
    parse_setup,
    same_field,
)
from pdserve.cluster.launcher import ServeSettings
from pdserve.settings import from_args

# RunSettings fields that each setup decides (where to send, under which name, whether with
# priorities: the ``-prio`` setups).
EXCLUDED = ("url", "label", "api_key", "send_priority")
COMPARE_LIST_FIELDS = (*LIST_FIELDS, "setups", "mixes")
WARMUP_OUTPUT_TOKENS = 8
# What the output directory holds (figures: benchmark.compare.figures).
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
POINTS_DIR = "points"
# A P99 from fewer requests is one or two requests' latency: no P99 claim below this.
MIN_P99_REQUESTS = 100
# Below this many repetitions a spread says little: no ratio is called a win or a loss.
MIN_REPETITIONS = 3
# Ratios this close to 1.0 in every repetition are no difference: below the knee every setup
# serves the offered load, and goodput ratios of 1.002-1.008 are that, not a win.
TIE_MARGIN = 0.02
# What a --mixes entry may set (workload, load and SLOs); the rest is the comparison's.
MIX_FIELDS = (
    "workload",
    "input_len",
    "output_len",
    "num_requests",
    "max_context",
    "arrival",
    "rate",
    "concurrency",
    "burstiness",
    "slo_ttft_ms",
    "slo_tpot_ms",
    "high_priority_fraction",
    "time_limit_s",
    "prefix_groups",
    "prefix_len",
    "turns",
    "think_time_s",
    "conversation_prompts",
)


class CompareSettings(RunSettings, SetupSettings):
    """``pdserve bench run``'s settings (workload, arrivals, SLOs) plus what the setups need."""

    model_config = ConfigDict(extra="forbid")

    # Fields of its own (like other settings models' in shape only).
    model: str | None = same_field(ServeSettings, "model")
    output_dir: str = Field(
        "bench-compare", description="where report.md, results.json, point JSONs and PNGs go"
    )
    setups: list[str] | None = Field(
        None,
        description=f"setups to measure, in order: {ROUTER}, {PDSERVE_RR}, pdserve-XpYd, "
        "pdserve-XpYd-resched with X + Y = --instances (default: all four, X = N/2); also "
        f"{ROUTER}-POLICY (e.g. {ROUTER}-cache-aware) and pdserve-POLICY[-resched]",
    )
    repetitions: int = Field(
        MIN_REPETITIONS,
        ge=1,
        description="passes over the setups, interleaved (A B C, B C A, C A B, ...), each "
        "setup started fresh and given fresh prompts; ratios are reported as median and "
        f"spread, and below {MIN_REPETITIONS} none is called a win",
    )
    mixes: list[str] | None = Field(
        None,
        description="workload mixes, each NAME:key=value,... over "
        f"{', '.join(MIX_FIELDS)} (several rates: rate=0.5/1); every started setup runs "
        "every mix, so the starts are shared (default: one mix, the flags above)",
    )
    candidate: str | None = Field(
        None,
        description="the setup whose ratios against every other setup are reported with "
        "their spread (default: the first of --setups)",
    )
    warmup_requests: int = Field(
        4,
        ge=0,
        description="requests sent to each setup before its sweep, not measured "
        f"(other prompts, {WARMUP_OUTPUT_TOKENS} output tokens)",
    )
    cross_check: bool = Field(
        False,
        description="also measure one setup at one rate with `vllm bench serve` (random "
        "dataset of --input-len/--output-len) and compare TTFT/TPOT",
    )
    cross_check_setup: str | None = Field(
        None, description="setup of the cross-check (default: the first one)"
    )
    cross_check_rate: float | None = Field(
        None, gt=0, description="request rate of the cross-check (default: the lowest --rate)"
    )
    cross_check_tolerance: float = Field(
        0.10, gt=0, description="relative TTFT/TPOT difference reported as agreement"
    )

    def setup_names(self) -> list[str]:
        return list(self.setups) if self.setups else default_setups(self.instances)

    def candidate_name(self) -> str:
        return self.candidate or self.setup_names()[0]

    def mix_list(self) -> list[Mix]:
        """The mixes, each with its settings (the flags, overridden by the mix's values)."""
        if not self.mixes:
            return [Mix(None, self)]
        base = self.model_dump(exclude={"mixes"})
        return [
            Mix(name, CompareSettings.model_validate(base | values))
            for name, values in map(parse_mix, self.mixes)
        ]

    def few_for_p99(self) -> list[str]:
        """The mixes (or '' for the only one) with fewer requests per point than a P99 needs."""
        return [m.name or "" for m in self.mix_list() if m.settings.num_requests < MIN_P99_REQUESTS]

    def cross_check_target(self) -> tuple[str, float]:
        setup = self.cross_check_setup or self.setup_names()[0]
        rate = self.cross_check_rate or min(self.rate)
        return setup, rate

    @model_validator(mode="after")
    def _consistent(self) -> CompareSettings:
        names = self.setup_names()
        if len(set(names)) != len(names):
            raise ValueError(f"setups named twice: {names}")
        for name in names:
            parse_setup(name, self.instances)
        if self.candidate is not None and self.candidate not in names:
            raise ValueError(f"--candidate {self.candidate} is not among the setups {names}")
        if self.mixes and self.cross_check:
            raise ValueError("--cross-check measures the flags' workload: not with --mixes")
        if self.mixes:
            mix_names = [parse_mix(m)[0] for m in self.mixes]
            if len(set(mix_names)) != len(mix_names):
                raise ValueError(f"mixes named twice: {mix_names}")
        if self.cross_check:
            if self.arrival == "closed":
                raise ValueError("--cross-check needs an open loop (--arrival poisson or gamma)")
            setup, rate = self.cross_check_target()
            if setup not in names:
                raise ValueError(f"--cross-check-setup {setup} is not among the setups {names}")
            if math.isinf(rate):
                raise ValueError("--cross-check-rate must be finite")
        return self


@dataclass(frozen=True)
class Mix:
    """One workload mix: its name (None: the only one, from the flags) and settings."""

    name: str | None
    settings: CompareSettings


def parse_mix(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,...`` as (name, the settings it changes); raises ValueError."""
    name, _, body = text.partition(":")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"mix {text!r}: NAME:key=value,... with a name of letters, digits, -, _")
    values: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, equals, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not equals or key not in MIX_FIELDS:
            raise ValueError(f"mix {name}: {item!r} is not key=value with a key of {MIX_FIELDS}")
        values[key] = value.split("/") if key in LIST_FIELDS else value
    return name, values


def add_compare_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Flags of every ``CompareSettings`` field but those each setup decides."""
    add_run_arguments(parser, CompareSettings, exclude=EXCLUDED, list_fields=COMPARE_LIST_FIELDS)


def settings_from_args(namespace: argparse.Namespace) -> CompareSettings:
    return from_args(CompareSettings, namespace)


def warn_about(settings: CompareSettings) -> list[str]:
    """What makes this comparison's claims weak, said before it spends the time."""
    warnings = []
    if settings.repetitions < MIN_REPETITIONS:
        warnings.append(
            f"{settings.repetitions} repetition(s): below {MIN_REPETITIONS} no ratio is called "
            "a win or a loss (one pass per setup is noise on a shared machine)"
        )
    few = settings.few_for_p99()
    if few:
        where = ", ".join(f"mix {m}" for m in few if m) or "every point"
        warnings.append(
            f"{where}: fewer than {MIN_P99_REQUESTS} requests per point, so P99 ratios are "
            "reported as 'too few requests', never as a win or a loss"
        )
    return warnings
