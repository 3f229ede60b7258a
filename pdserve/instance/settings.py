"""The settings of ``pdserve instance``: one model, from which its flags are generated.

KV transfer settings are nested (``kv``, flags ``--kv-*``) so that every field the connector
accepts is a flag with the connector's own default, declared once in ``pdserve.kv.settings``.
"""

from __future__ import annotations

import socket
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pdserve.kv.settings import KVTransferSettings
from pdserve.protocol.reports import Role


class InstanceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role = Field("both", description="what this instance does: prefill, decode or both")
    control_address: str | None = Field(
        None,
        description="the gateway's control-plane address to join, tcp://HOST:PORT "
        "(none: run standalone)",
        json_schema_extra={"deprecated_flags": ["--scheduler"]},
    )
    instance_id: str | None = Field(
        None, description="name in the cluster (default: ROLE-HOST-PORT)"
    )
    model: str | None = Field(
        None, description="model path or name for vLLM (default: the bundled SmolLM2-135M-Instruct)"
    )
    host: str = Field("127.0.0.1", description="address the HTTP server and KV servers bind")
    port: int = Field(8100, ge=1, le=65535, description="HTTP port of the OpenAI API server")
    advertise_host: str | None = Field(
        None, description="address other hosts use to reach this one (default: host)"
    )
    control_port: int | None = Field(
        None, ge=1, le=65535, description="engine control port for migration (default: free)"
    )
    kv: KVTransferSettings = Field(
        default_factory=KVTransferSettings, description="KV transfer (flags --kv-*)"
    )
    on_kv_failure: Literal["recompute", "fail"] = Field(
        "recompute", description="when a KV pull fails: prefill locally, or fail the request"
    )
    report_interval_s: float = Field(0.1, gt=0, description="seconds between load reports")
    prefix_events: bool = Field(
        True,
        description="in a cluster, tell the gateway what this instance's prefix cache holds "
        "(vLLM's KV events on loopback, relayed signed; the cache-aware policy routes by "
        "them); off: the gateway guesses from what it routed here, and --kv-events-config "
        "is left to you",
    )
    prefix_events_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="loopback port where vLLM publishes its KV events to the relay (default: free)",
    )
    priority_scheduling: bool = Field(
        False,
        description="vLLM's --scheduling-policy priority: a request's priority (the gateway "
        "passes the client's, lower first) orders the waiting queue and which running "
        "request is preempted last",
    )
    cpu_cores: str | None = Field(
        None, description="CPU build: cores for this instance's worker (VLLM_CPU_OMP_THREADS_BIND)"
    )
    kv_cache_gib: int = Field(
        2,
        ge=1,
        description="CPU build: KV cache size in whole GiB (vLLM's VLLM_CPU_KVCACHE_SPACE); "
        "for less, add vLLM's --num-gpu-blocks-override",
    )

    def resolved_id(self) -> str:
        return self.instance_id or f"{self.role}-{self.public_host()}-{self.port}"

    def public_host(self) -> str:
        if self.advertise_host:
            return self.advertise_host
        if self.host in ("0.0.0.0", "::"):
            return socket.gethostname()
        return self.host

    def url(self) -> str:
        return f"http://{self.public_host()}:{self.port}"
