"""``pdserve instance``: one vLLM OpenAI API server, configured for its role, in this process.

pdserve's own flags are declared once in ``InstanceSettings``; every other argument goes to
vLLM unchanged (``pdserve instance --role decode --max-num-seqs 64``). The server runs in this
process (vLLM's ``run_server``), next to a small agent thread that registers the instance with
the global scheduler and deregisters it on the way out, and (``--prefix-events``, on by
default in a cluster) the relay of its KV events to the gateway (``instance.prefix_relay``).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

from pdserve import bundled_model
from pdserve.instance.environment import (
    USER_OVERRIDABLE,
    cpu_environment,
    cpu_vllm_flags,
    is_cpu_build,
)
from pdserve.instance.prefix_relay import PrefixRelay, RelayThread, kv_events_config
from pdserve.instance.settings import InstanceSettings
from pdserve.kv.settings import KVSettings, kv_transfer_config
from pdserve.logs import get_logger
from pdserve.protocol.net import free_port, has_flag, is_loopback
from pdserve.protocol.wire import cluster_secret, instance_api_key

logger = get_logger(__name__)

SCHEDULER_CLS = "pdserve.instance.engine_scheduler.PdserveScheduler"
# vLLM flags pdserve sets itself; a user value would silently break the cluster.
RESERVED_VLLM_FLAGS = ("--kv-transfer-config", "--scheduler-cls")
# Set by pdserve while it relays the instance's prefix events (--prefix-events).
EVENTS_FLAG = "--kv-events-config"


def prepare_environment(settings: InstanceSettings, cpu: bool) -> None:
    """Environment of vLLM's processes; must be set before the engine is spawned."""
    if not cpu:
        return
    for key, value in cpu_environment(settings.kv_cache_gib, settings.cpu_cores).items():
        if key in USER_OVERRIDABLE:
            os.environ.setdefault(key, value)
        else:
            os.environ[key] = value


def kv_settings_for(settings: InstanceSettings) -> KVSettings:
    """The connector's settings: the user's ``--kv-*`` flags plus this instance's identity."""
    return KVSettings(
        **settings.kv.model_dump(exclude={"port"}),
        port=settings.kv.port or free_port(),
        instance_id=settings.resolved_id(),
        host=settings.host if settings.host not in ("0.0.0.0", "::") else "0.0.0.0",
        advertise_host=settings.public_host(),
        control_port=settings.control_port or free_port(),
        control_address=settings.control_address,
        report_interval_s=settings.report_interval_s,
        incarnation=uuid.uuid4().hex,
    )


def events_port_for(settings: InstanceSettings) -> int | None:
    """The loopback port of vLLM's KV events, if this instance relays them (in a cluster,
    with ``--prefix-events``)."""
    if not (settings.control_address and settings.prefix_events):
        return None
    return settings.prefix_events_port or free_port()


def start_relay(
    settings: InstanceSettings, kv: KVSettings, events_port: int | None
) -> RelayThread | None:
    """The relay, bound before vLLM's engine starts (its publisher connects to it)."""
    if events_port is None or settings.control_address is None:
        return None
    relay = RelayThread(
        PrefixRelay(kv.instance_id, kv.incarnation),
        events_port,
        settings.control_address,
        cluster_secret(is_loopback(settings.host)),
    )
    relay.start()
    logger.info("pdserve: relaying prefix events from 127.0.0.1:%d", events_port)
    return relay


def vllm_argv(
    settings: InstanceSettings,
    kv: KVSettings,
    model: str,
    served_name: str | None,
    extra: list[str],
    cpu: bool,
    events_port: int | None = None,
) -> list[str]:
    """The arguments of vLLM's API server: pdserve's own, then the user's. ``events_port``:
    where vLLM publishes its KV events for the relay (None: not at all)."""
    for flag in RESERVED_VLLM_FLAGS:
        if has_flag(extra, flag):
            raise SystemExit(f"pdserve instance sets {flag} itself; remove it from the arguments")
    if events_port is not None and has_flag(extra, EVENTS_FLAG):
        raise SystemExit(
            f"pdserve instance sets {EVENTS_FLAG} itself to relay prefix events; "
            "add --no-prefix-events to pass your own"
        )
    argv = ["--model", model, "--host", settings.host, "--port", str(settings.port)]
    if served_name and not has_flag(extra, "--served-model-name"):
        argv += ["--served-model-name", served_name]
    if cpu:
        argv += cpu_vllm_flags(extra)
    argv += [
        "--kv-transfer-config",
        json.dumps(kv_transfer_config(kv, settings.on_kv_failure)),
        "--scheduler-cls",
        SCHEDULER_CLS,
    ]
    if events_port is not None:
        argv += [EVENTS_FLAG, kv_events_config(events_port)]
    if settings.priority_scheduling and not has_flag(extra, "--scheduling-policy"):
        argv += ["--scheduling-policy", "priority"]
    if settings.control_address and not has_flag(extra, "--api-key"):
        # In a cluster, only holders of the cluster secret (the gateway) may call /v1.
        argv += ["--api-key", instance_api_key(cluster_secret(is_loopback(settings.host)))]
    return argv + extra


def run(settings: InstanceSettings, extra: list[str]) -> int:
    """Runs the instance until it is stopped; returns the exit code."""
    cpu = is_cpu_build()
    prepare_environment(settings, cpu)
    model, served_name = bundled_model.resolve(settings.model)
    kv = kv_settings_for(settings)
    events_port = events_port_for(settings)
    argv = vllm_argv(settings, kv, model, served_name, extra, cpu, events_port)
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
    relay = start_relay(settings, kv, events_port)
    if settings.control_address:
        from pdserve.instance.agent import RegistrationAgent, tokenizer_of

        agent = RegistrationAgent(
            settings,
            kv,
            pid=os.getpid(),
            tp_size=args.tensor_parallel_size,
            tokenizer=tokenizer_of(args),
        )
        agent.start()
    import uvloop

    started = time.time()
    try:
        uvloop.run(run_server(args))
    finally:
        if agent is not None:
            agent.stop()
        if relay is not None:
            relay.stop()
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
