"""``pdserve instance``: one vLLM OpenAI API server, configured for its role, in this process.

pdserve's own flags are declared once in ``InstanceSettings``; every other argument goes to
vLLM unchanged (``pdserve instance --role decode --max-num-seqs 64``). The server runs in this
process (vLLM's ``run_server``), next to a small agent thread that registers the instance with
the global scheduler and deregisters it on the way out.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pdserve import bundled_model
from pdserve.cluster.processes import free_port
from pdserve.instance.reports import Role
from pdserve.kv.settings import KVSettings, kv_transfer_config
from pdserve.logs import get_logger

logger = get_logger(__name__)

SCHEDULER_CLS = "pdserve.instance.engine_scheduler.PdserveScheduler"
# vLLM flags pdserve sets itself; a user value would silently break the cluster.
RESERVED_VLLM_FLAGS = ("--kv-transfer-config", "--scheduler-cls")


class InstanceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role = Field("both", description="what this instance does: prefill, decode or both")
    scheduler: str | None = Field(
        None, description="global scheduler to join, tcp://HOST:PORT (none: run standalone)"
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
    kv_port: int | None = Field(
        None, ge=1, le=65535, description="KV server port of TP rank 0 (default: a free port)"
    )
    control_port: int | None = Field(
        None, ge=1, le=65535, description="engine control port for migration (default: free)"
    )
    kv_lease_s: float = Field(30.0, gt=0, description="seconds an unpulled prefill keeps its KV")
    kv_transfer_timeout_s: float = Field(
        10.0, gt=0, description="seconds before a stalled KV transfer is abandoned"
    )
    kv_staging: Literal["never", "auto", "always"] = Field(
        "never", description="gather KV blocks into few large messages (see KVSettings.staging)"
    )
    on_kv_failure: Literal["recompute", "fail"] = Field(
        "recompute", description="when a KV pull fails: prefill locally, or fail the request"
    )
    report_interval_s: float = Field(0.1, gt=0, description="seconds between load reports")
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


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def is_cpu_build() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def prepare_environment(settings: InstanceSettings, cpu: bool) -> None:
    """Environment of vLLM's processes; must be set before the engine is spawned."""
    if cpu:
        # See patches/mq_busy_loop.py: spinning queues steal the CPU the workers compute on.
        os.environ.setdefault("PDSERVE_VLLM_PATCHES", "mq_busy_loop")
        os.environ["VLLM_TARGET_DEVICE"] = "cpu"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
        if settings.cpu_cores is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_cores
        if settings.cpu_cores == "nobind":
            # Instances sharing cores: one OpenMP thread per worker. With one thread per core
            # each, OpenMP's spinning barriers wait on threads that are not running.
            os.environ.setdefault("OMP_NUM_THREADS", "1")


def kv_settings_for(settings: InstanceSettings) -> KVSettings:
    return KVSettings(
        instance_id=settings.resolved_id(),
        host=settings.host if settings.host not in ("0.0.0.0", "::") else "0.0.0.0",
        advertise_host=settings.public_host(),
        port=settings.kv_port or free_port(),
        lease_s=settings.kv_lease_s,
        transfer_timeout_s=settings.kv_transfer_timeout_s,
        staging=settings.kv_staging,
        control_port=settings.control_port or free_port(),
        scheduler=settings.scheduler,
        report_interval_s=settings.report_interval_s,
    )


def vllm_argv(
    settings: InstanceSettings,
    kv: KVSettings,
    model: str,
    served_name: str | None,
    extra: list[str],
    cpu: bool,
) -> list[str]:
    """The arguments of vLLM's API server: pdserve's own, then the user's."""
    for flag in RESERVED_VLLM_FLAGS:
        if _has_flag(extra, flag):
            raise SystemExit(f"pdserve instance sets {flag} itself; remove it from the arguments")
    argv = ["--model", model, "--host", settings.host, "--port", str(settings.port)]
    if served_name and not _has_flag(extra, "--served-model-name"):
        argv += ["--served-model-name", served_name]
    if cpu:
        # float32: bf16 gave wrong greedy output on this CPU build; eager: skips a long compile.
        if not _has_flag(extra, "--dtype"):
            argv += ["--dtype", "float32"]
        if not _has_flag(extra, "--enforce-eager"):
            argv.append("--enforce-eager")
    argv += [
        "--kv-transfer-config",
        json.dumps(kv_transfer_config(kv, settings.on_kv_failure)),
        "--scheduler-cls",
        SCHEDULER_CLS,
    ]
    if settings.scheduler and not _has_flag(extra, "--api-key"):
        # In a cluster, only holders of the cluster secret (the gateway) may call /v1.
        from pdserve.instance.agent import instance_api_key
        from pdserve.wire import cluster_secret, is_loopback

        argv += ["--api-key", instance_api_key(cluster_secret(is_loopback(settings.host)))]
    return argv + extra


def run(settings: InstanceSettings, extra: list[str]) -> int:
    """Runs the instance until it is stopped; returns the exit code."""
    cpu = is_cpu_build()
    prepare_environment(settings, cpu)
    model, served_name = bundled_model.resolve(settings.model)
    kv = kv_settings_for(settings)
    argv = vllm_argv(settings, kv, model, served_name, extra, cpu)
    logger.info(
        "pdserve: starting %s instance %s on %s", settings.role, kv.instance_id, settings.url()
    )

    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import (
        make_arg_parser,
        validate_parsed_serve_args,
    )
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    args = make_arg_parser(FlexibleArgumentParser(prog="pdserve instance")).parse_args(argv)
    validate_parsed_serve_args(args)

    agent = None
    if settings.scheduler:
        from pdserve.instance.agent import RegistrationAgent

        agent = RegistrationAgent(settings, kv, pid=os.getpid(), tp_size=args.tensor_parallel_size)
        agent.start()
    import uvloop

    started = time.time()
    try:
        uvloop.run(run_server(args))
    finally:
        if agent is not None:
            agent.stop()
        logger.info(
            "pdserve: instance %s stopped after %.0f s", kv.instance_id, time.time() - started
        )
    return 0


def main(settings: InstanceSettings, extra: list[str]) -> int:
    try:
        return run(settings, extra)
    except KeyboardInterrupt:
        return 130
    except SystemExit as e:
        if isinstance(e.code, str):
            print(f"pdserve instance: {e.code}", file=sys.stderr)
            return 2
        raise
