"""``pdserve bench compare``'s settings: ``bench run``'s (workload, arrivals, SLOs), the setups'
(how every setup is started) and the comparison's own, and the flags made from them."""

from __future__ import annotations

import argparse
import math

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

# RunSettings fields that each setup decides (where to send, under which name).
EXCLUDED = ("url", "label", "api_key")
COMPARE_LIST_FIELDS = (*LIST_FIELDS, "setups")
WARMUP_OUTPUT_TOKENS = 8
# What the output directory holds (figures: benchmark.compare.figures).
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
POINTS_DIR = "points"


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
        "pdserve-XpYd-resched with X + Y = --instances (default: all four, X = N/2)",
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
        if self.cross_check:
            if self.arrival == "closed":
                raise ValueError("--cross-check needs an open loop (--arrival poisson or gamma)")
            setup, rate = self.cross_check_target()
            if setup not in names:
                raise ValueError(f"--cross-check-setup {setup} is not among the setups {names}")
            if math.isinf(rate):
                raise ValueError("--cross-check-rate must be finite")
        return self


def add_compare_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Flags of every ``CompareSettings`` field but those each setup decides."""
    add_run_arguments(parser, CompareSettings, exclude=EXCLUDED, list_fields=COMPARE_LIST_FIELDS)


def settings_from_args(namespace: argparse.Namespace) -> CompareSettings:
    return from_args(CompareSettings, namespace)
