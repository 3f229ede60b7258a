"""The serving systems ``pdserve bench compare`` measures, each started alone on this machine.

A setup is named on the command line (``--setups``):

``vllm-router``
    N plain vLLM instances (no pdserve code in them) behind the Rust ``vllm-router`` (PyPI
    ``vllm-router`` 0.1.x) in round-robin mode: the usual colocated deployment.
``vllm-router-POLICY``
    The same under another vllm-router policy (``-`` for ``_``): ``vllm-router-cache-aware``
    is its ``cache_aware`` (an approximate radix tree of the prompt *text* per worker,
    routing to the longest match above ``--cache-threshold`` 0.3 of the text, else to the
    worker with the smallest tree, and to the shortest queue once the load differs by more
    than 64 requests and 1.5x; its defaults). It routes a token-id prompt on the string
    ``token_ids:<count>``, not on the ids, so prompts it should match must be text
    (``--conversation-prompts text``).
``pdserve-rr``
    ``pdserve serve --both N --policy round-robin``: the same N colocated instances behind
    pdserve's gateway, which shows what the gateway itself costs.
``pdserve-XpYd``
    ``pdserve serve --prefill X --decode Y`` (X + Y = N) with the default ``pd`` policy.
``pdserve-XpYd-resched``
    The same with live rescheduling between decode instances (``--rescheduling``).
``...-prio`` (after any pdserve setup's name)
    The same with priorities on: vLLM's priority scheduling (``--priority-scheduling``) and
    the client sending each high-priority request's ``priority`` (``--high-priority-fraction``
    of them); every other setup gets no priorities, so ``pdserve-adaptive-prio`` against
    ``pdserve-adaptive`` is priorities on against off.
``pdserve-POLICY`` (and ``pdserve-POLICY-resched``)
    ``pdserve serve --both N --policy POLICY``: N ``both`` instances under any dispatch
    policy ``pdserve serve`` has (``pdserve-adaptive`` once that policy exists); the
    scheduler decides per request what each instance does.

Every instance of every setup runs the same model with the same vLLM flags and KV cache size,
and gets the same cores: the N instances split this process's CPUs evenly, as ``pdserve serve``
splits them (``pdserve.cluster.launcher.assign_cores``). On the CPU build a plain vLLM instance
also gets the ``mq_busy_loop`` patch (``PDSERVE_VLLM_PATCHES``) that every pdserve instance
gets, so the comparison is of the architectures, not of that patch.

Planning (argv, environment, ports, cores) is separate from running, so what would be started
can be checked without starting anything.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field

from benchmark.local_cluster import healthy, instances, instances_url
from pdserve.cluster.launcher import ServeSettings, assign_cores
from pdserve.cluster.processes import (
    ManagedProcess,
    free_port,
    http_ok,
    pdserve_argv,
    port_in_use,
    wait_until,
)
from pdserve.instance.environment import cpu_environment, cpu_vllm_flags
from pdserve.instance.settings import InstanceSettings
from pdserve.protocol.net import has_flag
from pdserve.scheduler.dispatch import PolicyName

ROUTER = "vllm-router"
PDSERVE_RR = "pdserve-rr"
XPYD = re.compile(r"^pdserve-(\d+)p(\d+)d(-resched)?(-prio)?$")
ROUTER_POLICY = re.compile(r"^vllm-router-([a-z][a-z-]*)$")
# vllm-router 0.1.x's policies that need nothing but the workers' URLs (kv_aware needs
# KV event sources, sticky_least_loaded session ids).
ROUTER_POLICIES = ("round_robin", "cache_aware", "power_of_two", "random", "consistent_hash")
POLICY_SETUP = re.compile(r"^pdserve-([a-z][a-z-]*?)(-resched)?(-prio)?$")
STOP_GRACE_S = 60.0


def same_field(model: type[BaseModel], name: str) -> Any:
    """Another settings model's field, default, bounds and help included: one source of truth."""
    return model.model_fields[name]


class SetupSettings(BaseModel):
    """How every setup is started; the same for all of them."""

    instances: int = Field(
        2, ge=1, description="vLLM instances of every setup (N); xPyD setups need X + Y = N"
    )
    kv_cache_gib: int = same_field(InstanceSettings, "kv_cache_gib")
    start_timeout_s: float = same_field(ServeSettings, "start_timeout_s")
    patch_plain_vllm: bool = Field(
        True,
        description="CPU build: give plain vLLM the mq_busy_loop patch pdserve instances get",
    )
    host: str = Field("127.0.0.1", description="address every server of every setup binds")
    log_dir: str | None = Field(
        None, description="where each process logs (default: a new folder under the cache)"
    )


@dataclass(frozen=True)
class SetupSpec:
    """What one setup is: which instances, which router, which policy."""

    name: str
    kind: Literal["vllm-router", "pdserve"]
    prefill: int = 0
    decode: int = 0
    both: int = 0
    policy: str = "pd"
    rescheduling: bool = False
    # ``-prio``: vLLM's priority scheduling on, and the client sends the requests' priorities
    # (every other setup gets none: priorities off).
    priorities: bool = False

    @property
    def instances(self) -> int:
        return self.prefill + self.decode + self.both

    def describe(self) -> str:
        if self.kind == "vllm-router":
            return f"{self.both} plain vLLM instances behind vllm-router ({self.policy})"
        if self.both:
            text = f"pdserve, {self.both} colocated instances, policy {self.policy}"
        else:
            text = f"pdserve {self.prefill}P{self.decode}D, policy {self.policy}"
        text += ", live rescheduling" if self.rescheduling else ""
        return text + (", priorities (vLLM's priority scheduling)" if self.priorities else "")


def parse_setup(name: str, instances: int) -> SetupSpec:
    """The setup a ``--setups`` name stands for, with ``instances`` instances in all."""
    if name == ROUTER:
        return SetupSpec(name, "vllm-router", both=instances, policy="round_robin")
    if router := ROUTER_POLICY.match(name):
        policy = router[1].replace("-", "_")
        if policy not in ROUTER_POLICIES:
            raise ValueError(
                f"setup {name}: vllm-router's policy must be one of "
                + ", ".join(p.replace("_", "-") for p in ROUTER_POLICIES)
            )
        return SetupSpec(name, "vllm-router", both=instances, policy=policy)
    if name == PDSERVE_RR:
        return SetupSpec(name, "pdserve", both=instances, policy="round-robin")
    match = XPYD.match(name)
    if match is None:
        return _policy_setup(name, instances)
    prefill, decode = int(match[1]), int(match[2])
    if prefill < 1 or decode < 1 or prefill + decode != instances:
        raise ValueError(
            f"setup {name}: needs X >= 1 prefill and Y >= 1 decode instances with "
            f"X + Y = --instances ({instances})"
        )
    return SetupSpec(
        name,
        "pdserve",
        prefill=prefill,
        decode=decode,
        rescheduling=bool(match[3]),
        priorities=bool(match[4]),
    )


def _policy_setup(name: str, instances: int) -> SetupSpec:
    """``pdserve-POLICY[-resched][-prio]``: every instance ``both``, the policy decides."""
    match = POLICY_SETUP.match(name)
    policies = get_args(PolicyName)
    if match is None or match[1] not in policies:
        raise ValueError(
            f"unknown setup {name!r}: {ROUTER}[-POLICY], {PDSERVE_RR}, pdserve-XpYd[-resched][-prio] "
            f"or pdserve-POLICY[-resched][-prio] with POLICY one of {', '.join(policies)}"
        )
    return SetupSpec(
        name,
        "pdserve",
        both=instances,
        policy=match[1],
        rescheduling=bool(match[2]),
        priorities=bool(match[3]),
    )


def default_setups(instances: int) -> list[str]:
    """Colocated (vllm-router, pdserve round-robin), xPyD, xPyD with rescheduling."""
    names = [ROUTER, PDSERVE_RR]
    if instances >= 2:
        prefill = instances // 2
        xpyd = f"pdserve-{prefill}p{instances - prefill}d"
        names += [xpyd, xpyd + "-resched"]
    return names


def router_available() -> bool:
    return importlib.util.find_spec("vllm_router") is not None


@dataclass
class ProcessSpec:
    """One process of a setup: how it is started and when it counts as ready."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment
    ready_url: str = ""  # polled until it answers 200 (after start, or before the next)
    expect_instances: int = 0  # > 0: ready_url lists instances, this many must be healthy
    port: int = 0
    after_ready: bool = False  # started only once every process before it is ready


@dataclass
class SetupPlan:
    spec: SetupSpec
    processes: list[ProcessSpec]
    endpoint: str  # base URL of the OpenAI endpoint (without /v1)
    cores: list[str]  # per instance, in start order
    instance_urls: list[str] = field(default_factory=list)  # known before start (plain vLLM)
    gateway: bool = False  # a pdserve gateway: instances are listed at /admin/instances

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "description": self.spec.describe(),
            "endpoint": self.endpoint,
            "cores": self.cores,
            "processes": [{"name": p.name, "argv": p.argv, "env": p.env} for p in self.processes],
        }


@dataclass(frozen=True)
class Launch:
    """What every setup shares: resolved model, vLLM arguments, machine."""

    settings: SetupSettings
    model: str  # what vLLM loads
    served_name: str | None  # the name it serves under (None: the model argument)
    user_model: str | None  # what the user asked for (None: pdserve's bundled model)
    vllm_args: tuple[str, ...] = ()
    cpu: bool = True
    cores: tuple[int, ...] = (0, 1)


def plain_vllm_argv(launch: Launch, port: int) -> list[str]:
    """A stock vLLM OpenAI server, with the flags a pdserve instance adds on the CPU build."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", launch.model]
    if launch.served_name and not has_flag(launch.vllm_args, "--served-model-name"):
        argv += ["--served-model-name", launch.served_name]
    argv += ["--host", launch.settings.host, "--port", str(port)]
    if launch.cpu:
        argv += cpu_vllm_flags(launch.vllm_args)
    return argv + list(launch.vllm_args)


def plain_vllm_env(launch: Launch, cores: str) -> dict[str, str]:
    """What ``pdserve instance`` sets for itself on the CPU build (the same helper)."""
    if not launch.cpu:
        return {}
    return cpu_environment(
        launch.settings.kv_cache_gib, cores, patches=launch.settings.patch_plain_vllm
    )


def plan_router(spec: SetupSpec, launch: Launch, port: Callable[[], int]) -> SetupPlan:
    host = launch.settings.host
    bindings, _ = assign_cores(spec.instances, list(launch.cores))
    processes, urls = [], []
    for index, cores in enumerate(bindings):
        instance_port = port()
        url = f"http://{host}:{instance_port}"
        urls.append(url)
        processes.append(
            ProcessSpec(
                f"vllm-{index}",
                plain_vllm_argv(launch, instance_port),
                plain_vllm_env(launch, cores),
                ready_url=url + "/health",
                port=instance_port,
            )
        )
    router_port, metrics_port = port(), port()
    router = [
        sys.executable,
        "-m",
        "vllm_router.launch_router",
        "--host",
        host,
        "--port",
        str(router_port),
        "--worker-urls",
        *urls,
        "--policy",
        spec.policy,
        # Its Prometheus exporter listens on a fixed port by default.
        "--prometheus-host",
        host,
        "--prometheus-port",
        str(metrics_port),
        "--worker-startup-check-interval",
        "1",
    ]
    endpoint = f"http://{host}:{router_port}"
    processes.append(
        ProcessSpec(
            ROUTER, router, ready_url=endpoint + "/health", port=router_port, after_ready=True
        )
    )
    return SetupPlan(spec, processes, endpoint, bindings, instance_urls=urls)


# Policies that place against the cluster's SLOs (pdserve.scheduler.slo): they get the
# comparison's --slo-ttft-ms / --slo-tpot-ms, which the comparison itself consumes.
SLO_POLICIES = ("adaptive",)


def slo_args(spec: SetupSpec, settings: SetupSettings) -> list[str]:
    """``--slo-ttft-ms X --slo-tpot-ms Y`` for an SLO-aware policy, from the comparison's
    settings (a ``CompareSettings``); the SLO it is judged by is the one it aims at."""
    if spec.kind != "pdserve" or spec.policy not in SLO_POLICIES:
        return []
    out = []
    for flag, name in (("--slo-ttft-ms", "slo_ttft_ms"), ("--slo-tpot-ms", "slo_tpot_ms")):
        value = getattr(settings, name, None)
        if value is not None:
            out += [flag, f"{value:g}"]
    return out


def plan_pdserve(
    spec: SetupSpec, launch: Launch, port: Callable[[], int], log_dir: Path
) -> SetupPlan:
    host = launch.settings.host
    gateway_port, control_port = port(), port()
    argv = pdserve_argv(
        "serve",
        "--prefill",
        str(spec.prefill),
        "--decode",
        str(spec.decode),
        "--both",
        str(spec.both),
        "--policy",
        spec.policy,
        "--rescheduling" if spec.rescheduling else "--no-rescheduling",
        *(["--priority-scheduling"] if spec.priorities else []),
        "--host",
        host,
        "--port",
        str(gateway_port),
        "--control-host",
        host,
        "--control-port",
        str(control_port),
        "--kv-cache-gib",
        str(launch.settings.kv_cache_gib),
        "--start-timeout-s",
        f"{launch.settings.start_timeout_s:g}",
        "--log-dir",
        str(log_dir),
        *(["--model", launch.user_model] if launch.user_model else []),
        *slo_args(spec, launch.settings),
        *launch.vllm_args,
    )
    endpoint = f"http://{host}:{gateway_port}"
    # pdserve serve pins exactly like this (the same function, the same cores).
    bindings, _ = assign_cores(spec.instances, list(launch.cores))
    serve = ProcessSpec(
        "pdserve-serve",
        argv,
        ready_url=instances_url(endpoint),
        expect_instances=spec.instances,
        port=gateway_port,
    )
    return SetupPlan(spec, [serve], endpoint, bindings, gateway=True)


def plan_setup(
    spec: SetupSpec, launch: Launch, log_dir: Path, port: Callable[[], int] = free_port
) -> SetupPlan:
    if spec.kind == "vllm-router":
        return plan_router(spec, launch, port)
    return plan_pdserve(spec, launch, port, log_dir)


def fetch_text(url: str, timeout: float = 5.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return str(response.read().decode("utf-8", errors="replace"))
    except (urllib.error.URLError, OSError, ValueError):
        return None


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_total(text: str, name: str, **labels: str) -> float | None:
    """Sum of every sample of ``name`` whose labels include ``labels``; None if none."""
    total, found = 0.0, False
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match[1] != name:
            continue
        have = dict(_LABEL.findall(match[2] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            try:
                total += float(match[3])
            except ValueError:
                continue
            found = True
    return total if found else None


# Counters read before and after every load point; their differences go into the report.
Counters = dict[str, tuple[str, dict[str, str]]]
# The prefix cache's are in tokens (vLLM counts queried and cached prompt tokens); the KV
# bytes are what instances pulled from each other (benchmark.cache_counters).
VLLM_COUNTERS: Counters = {
    "preemptions": ("vllm:num_preemptions_total", {}),
    "prefix_cache_queries": ("vllm:prefix_cache_queries_total", {}),
    "prefix_cache_hits": ("vllm:prefix_cache_hits_total", {}),
}
GATEWAY_COUNTERS: Counters = {
    "migrations": ("pdserve_migrations_total", {"result": "completed"}),
    "dispatch_disaggregated": ("pdserve_dispatches_total", {"mode": "disaggregated"}),
    "dispatch_local": ("pdserve_dispatches_total", {"mode": "local"}),
    "kv_received_bytes": ("pdserve_kv_received_bytes_total", {}),
}


class RunningSetup:
    """The processes of one setup; ``stop`` leaves nothing of it running."""

    def __init__(self, plan: SetupPlan, log_dir: Path) -> None:
        self.plan = plan
        self.log_dir = log_dir
        self.processes: list[ManagedProcess] = []
        self.instance_urls = list(plan.instance_urls)

    @property
    def name(self) -> str:
        return self.plan.spec.name

    @property
    def endpoint(self) -> str:
        return self.plan.endpoint

    def _ready(self, spec: ProcessSpec) -> bool:
        if spec.expect_instances:
            return len(healthy(instances(self.endpoint, timeout=2.0))) >= spec.expect_instances
        return http_ok(spec.ready_url)

    def start(self, timeout_s: float) -> None:
        """Starts the processes (together, but a router only once its workers are ready) and
        waits until every one is ready; raises on failure, leaving the caller to ``stop``."""
        deadline = time.monotonic() + timeout_s
        pending: list[ProcessSpec] = []
        for spec in self.plan.processes:
            if spec.after_ready:
                self._wait(pending, deadline)
                pending = []
            self.processes.append(
                ManagedProcess(
                    spec.name,
                    spec.argv,
                    self.log_dir / f"{spec.name}.log",
                    env={**os.environ, **spec.env},
                )
            )
            pending.append(spec)
        self._wait(pending, deadline)

    def _wait(self, specs: Sequence[ProcessSpec], deadline: float) -> None:
        for spec in specs:
            if not spec.ready_url:
                continue
            wait_until(
                lambda spec=spec: self._ready(spec),  # type: ignore[misc]
                max(1.0, deadline - time.monotonic()),
                f"{self.name}: {spec.name}",
                self.processes,
            )
            if spec.expect_instances:
                self.instance_urls = [
                    str(r["url"]) for r in healthy(instances(self.endpoint)) if r.get("url")
                ]

    def check_alive(self) -> None:
        for proc in self.processes:
            if not proc.alive():
                raise RuntimeError(
                    f"{self.name}: {proc.name} exited with code {proc.proc.returncode}; "
                    f"last lines of {proc.log_path}:\n{proc.log_tail(15)}"
                )

    def counters(self) -> dict[str, float]:
        """vLLM's preemptions and prefix-cache counts (all instances) and, behind pdserve,
        migrations, dispatches and KV bytes moved."""
        found: dict[str, float] = {}
        texts = [fetch_text(url + "/metrics") for url in self.instance_urls]
        for key, (name, labels) in VLLM_COUNTERS.items():
            values = [metric_total(t, name, **labels) for t in texts if t]
            if values and all(v is not None for v in values):
                found[key] = sum(v for v in values if v is not None)
        if self.plan.gateway:
            text = fetch_text(self.endpoint + "/metrics")
            for key, (name, labels) in GATEWAY_COUNTERS.items():
                value = metric_total(text, name, **labels) if text else None
                # A labelled counter appears only once it has counted something.
                found[key] = value if value is not None else 0.0
        return found

    def stop(self) -> None:
        """Stops every process (last started first) and waits until their ports are free."""
        for proc in reversed(self.processes):
            proc.stop(grace_s=STOP_GRACE_S)
        self.processes.clear()
        ports = [p.port for p in self.plan.processes if p.port]
        ports += [int(u.rsplit(":", 1)[1]) for u in self.instance_urls if u.count(":") == 2]
        host = self.plan.endpoint.split("//", 1)[1].rsplit(":", 1)[0]
        # A port still "in use" after 30 s is held by a socket in TIME_WAIT, not a server.
        with contextlib.suppress(TimeoutError):
            wait_until(
                lambda: not any(port_in_use(host, p) for p in ports),
                30,
                f"{self.name}: its ports to be released",
                interval_s=0.5,
            )
