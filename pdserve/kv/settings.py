"""Settings of the KV connector, carried in vLLM's ``kv_connector_extra_config["pdserve"]``.

vLLM hands ``--kv-transfer-config`` to the EngineCore process and to every worker, so this
one JSON object configures both sides of the connector. ``pdserve instance`` fills it in;
a user running ``vllm serve`` directly can write it by hand (see docs/kv-transfer.md).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CONNECTOR_CLASS = "PdConnector"
CONNECTOR_MODULE = "pdserve.kv.connector"
EXTRA_CONFIG_KEY = "pdserve"


class KVTransferSettings(BaseModel):
    """What a user tunes about KV transfer; ``pdserve instance`` shows it as ``--kv-*`` flags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="KV server port of TP rank 0; rank r uses port + r (default: a free port)",
    )
    lease_s: float = Field(
        30.0, gt=0, description="seconds a finished prefill keeps its KV blocks for a pull"
    )
    transfer_timeout_s: float = Field(
        10.0, gt=0, description="seconds a stalled transfer may take before it is abandoned"
    )
    pair_setup_timeout_s: float = Field(
        30.0,
        gt=0,
        description="seconds two workers may take to form their process group "
        "(once per pair of workers)",
    )
    sync_load_max_tokens: int = Field(
        64,
        ge=0,
        description="a load of at most this many tokens, or of at most one block beyond a "
        "local prefix-cache hit (a migration's tail), runs in the step that admits its "
        "request, before the forward: no extra engine steps, at the cost of that step waiting "
        "for the transfer; 0: every load is asynchronous",
    )
    pair_probe_timeout_s: float = Field(
        2.0,
        gt=0,
        description="seconds a peer's KV server may take to answer a liveness probe (before "
        "a pair forms, and whenever a transfer's peer goes silent); past it the peer counts "
        "as gone: the load fails at once (the prompt is computed locally) and its pairs close",
    )
    staging: Literal["never", "auto", "always"] = Field(
        "never",
        description="gather blocks into few large messages: never (zero-copy, one message "
        "per layer and run of blocks; fastest with gloo, see benchmark/kv_transfer.py), auto "
        "(when messages would average under 512 KiB), always",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend; auto: NCCL for CUDA caches, else gloo"
    )


class KVSettings(KVTransferSettings):
    """Everything the connector is told: the user's transfer settings plus who it is.

    ``pdserve instance`` fills in the identity (instance id, addresses, the engine's control
    port, where load reports go) from its own settings; only the inherited fields are flags.
    """

    instance_id: str = Field("standalone", description="name of this instance in the cluster")
    host: str = Field("127.0.0.1", description="address the KV server of each worker binds")
    advertise_host: str | None = Field(
        None, description="address peers use to reach the KV servers (default: host)"
    )
    port: int = Field(  # type: ignore[assignment]  # resolved: required here
        ..., ge=1, le=65535, description="KV server port of TP rank 0 (rank r uses port + r)"
    )
    control_port: int | None = Field(
        None, ge=1, le=65535, description="port of the engine control server (migration)"
    )
    control_address: str | None = Field(
        None, description="the gateway's control-plane address (tcp://host:port) for load reports"
    )
    report_interval_s: float = Field(0.1, gt=0, description="seconds between load reports")
    incarnation: str = Field("", description="random id of this start of the instance")

    def address_of_rank(self, rank: int) -> str:
        return f"tcp://{self.advertise_host or self.host}:{self.port + rank}"

    def bind_address_of_rank(self, rank: int) -> str:
        return f"tcp://{self.host}:{self.port + rank}"


def kv_transfer_config(
    settings: KVSettings, load_failure_policy: Literal["recompute", "fail"]
) -> dict[str, Any]:
    """The ``--kv-transfer-config`` object that loads pdserve's connector into vLLM."""
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        # Every pdserve instance can both export (prefill, migration source) and import
        # (decode, migration destination) KV.
        "kv_role": "kv_both",
        "kv_load_failure_policy": load_failure_policy,
        "kv_connector_extra_config": {EXTRA_CONFIG_KEY: settings.model_dump(exclude_none=True)},
    }


def from_extra_config(extra: dict[str, Any] | None) -> KVSettings:
    if not extra or EXTRA_CONFIG_KEY not in extra:
        raise ValueError(
            f"{CONNECTOR_CLASS} needs kv_connector_extra_config.{EXTRA_CONFIG_KEY} "
            "with at least a port; `pdserve instance` writes it for you"
        )
    return KVSettings.model_validate(extra[EXTRA_CONFIG_KEY])
