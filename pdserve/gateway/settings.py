"""Settings of the gateway (which also hosts the global scheduler's live side)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class GatewaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="address the OpenAI endpoint binds")
    port: int = Field(8000, ge=1, le=65535, description="port of the OpenAI endpoint")
    control_host: str = Field(
        "127.0.0.1", description="address where instances register and report load"
    )
    control_port: int = Field(7000, ge=1, le=65535, description="port of the control plane")
    api_key: str | None = Field(
        None, description="require 'Authorization: Bearer KEY' on every route but /health"
    )
    heartbeat_timeout_s: float = Field(
        1.0, gt=0, description="an instance silent this long is taken out of rotation"
    )
    dead_after_s: float = Field(
        5.0,
        gt=0,
        description="an instance silent this long is given up: its requests "
        "continue elsewhere (a broken connection is noticed at once)",
    )
    forget_after_s: float = Field(
        60.0, gt=0, description="an unhealthy instance silent this long is removed from the list"
    )
    max_inflight: int = Field(256, ge=1, description="requests served at once; more wait in line")
    max_queued: int = Field(
        1024, ge=0, description="requests waiting for a slot; beyond this: 429 with Retry-After"
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="larger request bodies are refused with 413"
    )
    upstream_connect_timeout_s: float = Field(5.0, gt=0, description="connecting to an instance")
    upstream_stall_timeout_s: float = Field(
        300.0, gt=0, description="longest silence of an instance inside one response"
    )
    admission_wait_s: float = Field(
        10.0,
        ge=0,
        description="longest a request is held while every decode instance is full, before "
        "it is placed whole on one (where it queues)",
    )
    shed_over_slo: bool = Field(
        False,
        description="admission control: refuse requests of the lowest priority class "
        "(--shed-priority) with 429 and Retry-After while no instance is predicted to meet "
        "their TTFT SLO (queued prompt tokens / measured prefill rate; the request's "
        "x-slo-ttft-ms, else the cluster's --slo-ttft-ms)",
    )
    shed_priority: int = Field(
        1,
        description="the lowest class for --shed-over-slo: requests whose priority (vLLM's: "
        "lower is scheduled earlier, 0 normal) is at least this",
    )
    prompt_tokenizer: str = Field(
        "auto",
        description="how the gateway counts prompt tokens (dispatch, admission, the "
        "context-length check): 'auto': with the tokenizer and chat template the model's "
        "instances register, read from this machine's disk (nothing is downloaded); 'none': "
        "estimated from characters (about 4 a token); else a tokenizer directory or a cached "
        "Hugging Face name, for every model",
    )
    prompt_tokenizer_threads: int = Field(
        2, ge=1, description="threads that load tokenizers and tokenize prompts, off the event loop"
    )
    recent_requests: int = Field(
        256,
        ge=0,
        description="finished requests the gateway remembers for /admin/requests?recent=N "
        "(their time to first token by phase)",
    )
    max_failovers: int = Field(
        2, ge=0, description="times a request continues on another instance after a failure"
    )
