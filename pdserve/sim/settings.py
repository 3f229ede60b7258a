"""``pdserve sim``'s settings, and its flags made from the same models ``pdserve serve`` uses.

The policy (``DispatchSettings``), the rescheduling (``ReschedulingSettings``) and the
gateway's limits (``GatewaySettings``, less what only a network server needs) are mounted
as they are, so a policy flag means the same in a simulation as in a real cluster; the
workload is the benchmark's own ``WorkloadSettings``. The SLOs that goodput counts are the
cluster's own (``DispatchSettings.slo``: ``--slo-ttft-ms``, ``--slo-tpot-ms``), which the
``adaptive`` policy also places against: one setting for both.
"""

from __future__ import annotations

import argparse
from typing import Literal

from pydantic import Field, field_validator

from pdserve.gateway.settings import GatewaySettings
from pdserve.protocol.reports import ROLES, Role
from pdserve.scheduler.dispatch import DispatchSettings
from pdserve.scheduler.rescheduling import ReschedulingSettings
from pdserve.settings import add_arguments, from_args
from pdserve.sim.cluster import InstanceChange
from pdserve.workload.workloads import WorkloadSettings

# Fields taking several values, added by hand (pdserve.settings makes scalar flags only).
LIST_FIELDS = {
    "rate": (float, "X", "requests per second; several values make a sweep"),
    "fail": (str, "ID@S", "instance ID fails at S seconds (e.g. decode-00@30)"),
    "join": (str, "ROLE@S", "an instance of ROLE joins at S seconds (e.g. decode@60)"),
}
# Gateway settings that mean something only to a real server.
GATEWAY_UNUSED = (
    "host",
    "port",
    "control_host",
    "control_port",
    "api_key",
    "max_body_bytes",
    "upstream_connect_timeout_s",
    "upstream_stall_timeout_s",
    # The simulator's requests carry their token ids, and it keeps no request rows.
    "prompt_tokenizer",
    "prompt_tokenizer_threads",
    "recent_requests",
)


class SimSettings(WorkloadSettings):
    """The simulated cluster, the load swept over it, and what is written."""

    prefill: int = Field(1, ge=0, description="prefill instances")
    decode: int = Field(1, ge=0, description="decode instances")
    both: int = Field(0, ge=0, description="colocated instances (prefill and decode)")
    profile: str = Field(
        "llama-2-7b-a10", description="step-time profile: a built-in name or a profile JSON"
    )
    arrival: Literal["poisson", "gamma"] = Field("poisson", description="arrival process")
    rate: list[float] = Field([1.0], description=LIST_FIELDS["rate"][2])
    burstiness: float = Field(
        1.0, gt=0, description="gamma shape: 1 = Poisson, <1 burstier, >1 more regular"
    )
    report_interval_s: float = Field(
        0.1, gt=0, description="seconds between an instance's load reports"
    )
    num_blocks: int | None = Field(
        None, ge=1, description="KV blocks per instance (default: the profile's)"
    )
    max_num_seqs: int | None = Field(
        None, ge=1, description="running sequences per instance (default: the profile's)"
    )
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="token budget of a step (default: the profile's)"
    )
    kv_watermark: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="fraction of an instance's blocks a newly admitted request must leave "
        "free (vLLM v1 keeps none)",
    )
    prefix_caching: bool = Field(True, description="model vLLM's prefix cache")
    priority_scheduling: bool = Field(
        False,
        description="vLLM's --priority-scheduling on every instance, and each request sent "
        "with its class (--high-priority-fraction) as vLLM's priority field, which the "
        "policies read too; off: sent alike, first come first served (the classes' TTFT is "
        "still reported apart)",
    )
    fail: list[str] = Field([], description=LIST_FIELDS["fail"][2])
    join: list[str] = Field([], description=LIST_FIELDS["join"][2])
    label: str | None = Field(
        None, description="name of this setup in the JSON and plots (default: the policy)"
    )
    json_out: str | None = Field(None, description="write the points as JSON to this file")
    plot: str | None = Field(None, description="draw pdserve bench's figures into this folder")

    @field_validator("fail")
    @classmethod
    def _check_fail(cls, values: list[str]) -> list[str]:
        for value in values:
            _split(value)
        return values

    @field_validator("join")
    @classmethod
    def _check_join(cls, values: list[str]) -> list[str]:
        for value in values:
            role, _ = _split(value)
            if role not in ROLES:
                raise ValueError(f"{value!r}: the role must be one of {', '.join(ROLES)}")
        return values

    def changes(self) -> list[InstanceChange]:
        """The failures and joins, in time order."""
        changes = [InstanceChange(at, instance_id=name) for name, at in map(_split, self.fail)]
        for role, at in map(_split, self.join):
            changes.append(InstanceChange(at, role=_role(role)))
        return sorted(changes, key=lambda c: c.at_s)


def _split(value: str) -> tuple[str, float]:
    name, at, seconds = value.rpartition("@")
    if not at or not name:
        raise ValueError(f"{value!r}: expected NAME@SECONDS")
    return name, float(seconds)


def _role(name: str) -> Role:
    for role in ROLES:
        if role == name:
            return role
    raise ValueError(name)


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of ``pdserve sim``, grouped as in ``pdserve serve``."""
    simulation = parser.add_argument_group("simulation")
    add_arguments(simulation, SimSettings, exclude={*LIST_FIELDS, "json_out"})
    for name, (kind, metavar, help_text) in LIST_FIELDS.items():
        simulation.add_argument(
            "--" + name,
            dest=name,
            nargs="+",
            type=kind,
            default=argparse.SUPPRESS,
            metavar=metavar,
            help=help_text,
        )
    simulation.add_argument(
        "--json",
        dest="json_out",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help=SimSettings.model_fields["json_out"].description,
    )
    add_arguments(parser.add_argument_group("dispatch policy"), DispatchSettings)
    add_arguments(parser.add_argument_group("rescheduling (live migration)"), ReschedulingSettings)
    add_arguments(parser.add_argument_group("gateway"), GatewaySettings, exclude=GATEWAY_UNUSED)


def sim_settings_from_args(
    namespace: argparse.Namespace,
) -> tuple[SimSettings, DispatchSettings, ReschedulingSettings, GatewaySettings]:
    return (
        from_args(SimSettings, namespace),
        from_args(DispatchSettings, namespace),
        from_args(ReschedulingSettings, namespace),
        from_args(GatewaySettings, namespace),
    )
