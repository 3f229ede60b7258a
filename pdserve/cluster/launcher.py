"""``pdserve serve``: a whole xPyD cluster on this machine, behind one OpenAI endpoint.

The launcher is only a supervisor. It starts ``pdserve gateway`` and one ``pdserve instance``
per prefill/decode/both slot as child processes (exactly what one would run on several
machines), gives each instance its own cores where there are enough, shows progress until
every instance has joined, prints the endpoint, and stops everything on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pdserve import bundled_model
from pdserve.cluster.processes import (
    ManagedProcess,
    free_port,
    pdserve_argv,
    port_in_use,
    wait_until,
)
from pdserve.gateway.settings import GatewaySettings
from pdserve.instance.settings import InstanceSettings
from pdserve.protocol.net import available_cores
from pdserve.protocol.reports import Role
from pdserve.protocol.wire import SECRET_ENV, new_secret
from pdserve.scheduler.dispatch import DispatchSettings
from pdserve.scheduler.rescheduling import ReschedulingSettings
from pdserve.settings import to_argv

# Instance flags the launcher decides per instance; all others are shared by every instance.
PER_INSTANCE_FIELDS = frozenset(
    {
        "role",
        "control_address",
        "instance_id",
        "host",
        "port",
        "advertise_host",
        "kv_port",
        "control_port",
        "prefix_events_port",
        "cpu_cores",
        "model",
    }
)


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prefill: int = Field(1, ge=0, description="prefill instances")
    decode: int = Field(1, ge=0, description="decode instances")
    both: int = Field(0, ge=0, description="instances that prefill and decode (colocated)")
    model: str | None = Field(
        None, description="model path or name (default: the bundled SmolLM2-135M-Instruct)"
    )
    log_dir: str | None = Field(
        None, description="where each process logs (default: a new folder under the cache)"
    )
    start_timeout_s: float = Field(600.0, gt=0, description="seconds to wait for every instance")
    max_restarts: int = Field(
        3,
        ge=0,
        description="times a gateway or instance that dies is started again (0: never)",
    )


@dataclass
class Slot:
    role: Role
    index: int
    port: int
    cores: str | None

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


def assign_cores(count: int, cores: list[int]) -> tuple[list[str], bool]:
    """Splits the cores evenly between ``count`` instances; (bindings, shared?).

    With fewer cores than instances nothing is pinned ("nobind"): two busy vLLM workers
    pinned to one core were seen to starve each other for tens of seconds (Linux 6.18),
    while unpinned workers are balanced by the kernel.
    """
    if count <= len(cores):
        per = len(cores) // count
        groups = [cores[i * per : (i + 1) * per] for i in range(count)]
        return [",".join(map(str, g)) for g in groups], False
    return ["nobind"] * count, True


def plan(serve: ServeSettings, gateway: GatewaySettings) -> tuple[list[Slot], list[str]]:
    """The instances to start, and warnings; raises ValueError for impossible layouts.

    Roles are preferences: a cluster without a decode-capable instance answers every request
    whole on its prefill instances (``pdserve.scheduler.dispatch.whole_on_any``).
    """
    if serve.prefill + serve.decode + serve.both == 0:
        raise ValueError("no instance to start: add --prefill N, --decode N or --both N")
    roles: list[Role] = []
    for role, count in (("prefill", serve.prefill), ("decode", serve.decode), ("both", serve.both)):
        roles += [role] * count  # type: ignore[list-item]
    bindings, shared = assign_cores(len(roles), available_cores())
    warnings = []
    if serve.decode + serve.both == 0:
        warnings.append(
            "no decode or both instance: every request is served whole (colocated) on a "
            "prefill instance"
        )
    if shared:
        warnings.append(
            f"{len(roles)} instances share {len(available_cores())} cores: expect lower throughput"
        )
    if port_in_use(gateway.host, gateway.port):
        raise ValueError(f"port {gateway.port} on {gateway.host} is in use: choose --port")
    if port_in_use(gateway.control_host, gateway.control_port):
        raise ValueError(f"control port {gateway.control_port} is in use: choose --control-port")
    counters: dict[str, int] = {}
    slots = []
    taken = {gateway.port, gateway.control_port}
    for role, cores in zip(roles, bindings, strict=False):
        index = counters.get(role, 0)
        counters[role] = index + 1
        port = free_port(gateway.host)
        while port in taken:  # the OS may hand out a port it just gave us again
            port = free_port(gateway.host)
        taken.add(port)
        slots.append(Slot(role, index, port, cores))
    return slots, warnings


def _log(message: str) -> None:
    print(f"[pdserve serve] {message}", flush=True)


def gateway_instances(
    url: str, api_key: str | None = None, timeout: float = 2.0
) -> list[dict[str, Any]]:
    """The instance table of the gateway at ``url`` (``GET /admin/instances``); [] while it
    does not answer. The one reader of that table (the benchmarks use it too)."""
    request = urllib.request.Request(url.rstrip("/") + "/admin/instances")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            rows = json.load(response)
    except (OSError, ValueError):
        return []
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


class Cluster:
    """The running processes of a local cluster."""

    def __init__(
        self,
        serve: ServeSettings,
        gateway: GatewaySettings,
        policies: list[BaseModel],
        instance: InstanceSettings,
        vllm_args: list[str],
    ) -> None:
        self.serve = serve
        self.gateway = gateway
        self.policies = policies
        self.instance = instance
        self.vllm_args = vllm_args
        self.processes: list[ManagedProcess] = []
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.log_dir = Path(serve.log_dir or bundled_model.cache_root() / "logs" / stamp)
        self.env = dict(os.environ)
        self.env.setdefault(SECRET_ENV, new_secret())

    @property
    def endpoint(self) -> str:
        return f"http://{self.gateway.host}:{self.gateway.port}/v1"

    def _start(self, name: str, argv: list[str]) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.log_dir / f"{name}.log", env=self.env)
        self.processes.append(proc)
        return proc

    def start(self, slots: list[Slot]) -> None:
        policy_argv = [flag for model in self.policies for flag in to_argv(model)]
        gateway_argv = pdserve_argv("gateway", *to_argv(self.gateway), *policy_argv)
        gateway = self._start("gateway", gateway_argv)
        wait_until(
            lambda: port_in_use(self.gateway.host, self.gateway.port),
            60,
            "the gateway to listen",
            [gateway],
            interval_s=0.2,
        )
        control_address = f"tcp://{self.gateway.control_host}:{self.gateway.control_port}"
        shared = to_argv(self.instance, exclude=PER_INSTANCE_FIELDS)
        model = ["--model", self.serve.model] if self.serve.model else []
        for slot in slots:
            argv = pdserve_argv(
                "instance",
                "--role",
                slot.role,
                "--control-address",
                control_address,
                "--instance-id",
                slot.name,
                "--host",
                self.gateway.host,
                "--port",
                str(slot.port),
                *model,
                *shared,
                *(["--cpu-cores", slot.cores] if slot.cores is not None else []),
                *self.vllm_args,
            )
            proc = self._start(slot.name, argv)
            _log(
                f"{slot.name}: starting on port {slot.port}, cores {slot.cores} "
                f"(log {proc.log_path})"
            )

    def wait_ready(self, slots: list[Slot]) -> None:
        started = time.monotonic()
        expected = {s.name for s in slots}
        announced: set[str] = set()

        def ready() -> bool:
            url = f"http://{self.gateway.host}:{self.gateway.port}"
            rows = gateway_instances(url, self.gateway.api_key)
            healthy = {row["id"] for row in rows if row.get("healthy")}
            for name in sorted(healthy - announced):
                _log(f"{name}: ready after {time.monotonic() - started:.0f} s")
                announced.add(name)
            return expected <= healthy

        wait_until(ready, self.serve.start_timeout_s, "every instance to join", self.processes)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()

    def watch(self) -> int:
        """Blocks until a signal arrives; starts again what dies, up to ``max_restarts`` each.

        A restarted gateway knows nothing of the requests in flight (their clients see the
        connection drop); the instances register with it again within seconds. A restarted
        instance registers under its old name and is used again once it reports load.
        """
        restarts: dict[str, int] = {}
        while True:
            time.sleep(1.0)
            for index, proc in enumerate(self.processes):
                if proc.alive():
                    continue
                used = restarts.get(proc.name, 0)
                if used >= self.serve.max_restarts:
                    if index == 0:
                        _log(f"the gateway exited ({proc.proc.returncode}) for good")
                        return 1
                    continue
                restarts[proc.name] = used + 1
                _log(
                    f"{proc.name} exited ({proc.proc.returncode}); starting it again "
                    f"({used + 1}/{self.serve.max_restarts}). Last lines of "
                    f"{proc.log_path}:\n{proc.log_tail(15)}"
                )
                self.processes[index] = proc.restarted()


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop


def main(
    serve: ServeSettings,
    gateway: GatewaySettings,
    dispatch: DispatchSettings,
    rescheduling: ReschedulingSettings,
    instance: InstanceSettings,
    vllm_args: list[str],
) -> int:
    try:
        slots, warnings = plan(serve, gateway)
    except ValueError as e:
        print(f"pdserve serve: {e}", file=sys.stderr)
        return 2
    for warning in warnings:
        _log(f"warning: {warning}")
    if serve.model is None:
        bundled_model.prepare()
    cluster = Cluster(serve, gateway, [dispatch, rescheduling], instance, vllm_args)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    started = time.monotonic()
    try:
        _log(
            f"starting {serve.prefill} prefill, {serve.decode} decode, {serve.both} both "
            f"instances; logs in {cluster.log_dir}"
        )
        cluster.start(slots)
        cluster.wait_ready(slots)
        _log(f"ready in {time.monotonic() - started:.0f} s: OpenAI endpoint {cluster.endpoint}")
        return cluster.watch()
    except _Stop:
        _log("stopping")
        return 0
    except (RuntimeError, TimeoutError) as e:
        _log(f"failed: {e}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cluster.stop()
        _log("stopped")
