"""The cluster's service-level objectives: one setting for the policies and the measurements.

``pdserve serve`` / ``pdserve gateway`` / ``pdserve sim`` mount these with the dispatch
settings (``--slo-ttft-ms``, ``--slo-tpot-ms``): the ``adaptive`` policy places requests
against them, and the simulator's goodput counts the requests that meet them. A request
may bring its own (``RequestEstimate.slo_ttft_ms`` / ``slo_tpot_ms``), which win.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pdserve.scheduler.snapshot import RequestEstimate


class SloSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_ms: float | None = Field(
        None,
        gt=0,
        description="time-to-first-token SLO (ms): adaptive places against it, "
        "--shed-over-slo refuses by it; goodput",
    )
    tpot_ms: float | None = Field(
        None, gt=0, description="time-per-output-token SLO (ms): adaptive packs decodes below it"
    )

    def ttft_s(self, request: RequestEstimate) -> float | None:
        """The request's TTFT objective in seconds (its own, else the cluster's)."""
        ms = request.slo_ttft_ms if request.slo_ttft_ms is not None else self.ttft_ms
        return None if ms is None else ms / 1e3

    def tpot_s(self, request: RequestEstimate) -> float | None:
        ms = request.slo_tpot_ms if request.slo_tpot_ms is not None else self.tpot_ms
        return None if ms is None else ms / 1e3
