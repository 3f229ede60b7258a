"""How a vLLM process is set up on the CPU build: its environment and the flags it needs.

One definition for ``pdserve instance`` and for the benchmark's plain-vLLM baselines, so a
comparison runs both under the same conditions (same patch, same OpenMP threads, same dtype).
"""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Sequence

from pdserve.protocol.net import has_flag

PATCHES_ENV = "PDSERVE_VLLM_PATCHES"
CPU_PATCHES = "mq_busy_loop"
# Values a user's own environment may override; the others are pdserve's per instance.
USER_OVERRIDABLE = frozenset({PATCHES_ENV, "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS"})


def is_cpu_build() -> bool:
    """vLLM's CPU build, told from package metadata (importing vLLM takes seconds)."""
    try:
        md.version("vllm-cpu")
        return True
    except md.PackageNotFoundError:
        pass
    try:
        return "cpu" in md.version("vllm")
    except md.PackageNotFoundError:
        return False


def cpu_environment(kv_cache_gib: int, cores: str | None, patches: bool = True) -> dict[str, str]:
    """Environment of vLLM's processes on the CPU build; must be set before they spawn.

    ``cores`` is vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` (a core list, or ``nobind`` when
    instances share cores). ``patches`` adds the ``mq_busy_loop`` patch (patches/): vLLM's
    spinning message queues steal the CPU that the workers compute on.
    """
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
    if patches:
        env[PATCHES_ENV] = CPU_PATCHES
    if cores is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cores
    if cores == "nobind":
        # Instances sharing cores: one OpenMP thread per worker. With one thread per core
        # each, OpenMP's spinning barriers wait on threads that are not running.
        env["OMP_NUM_THREADS"] = "1"
    return env


def cpu_vllm_flags(user_args: Sequence[str]) -> list[str]:
    """vLLM flags the CPU build needs, unless the user chose otherwise.

    float32: bf16 gave wrong greedy output on this CPU build; eager: skips a long compile.
    """
    flags: list[str] = []
    if not has_flag(user_args, "--dtype"):
        flags += ["--dtype", "float32"]
    if not has_flag(user_args, "--enforce-eager"):
        flags.append("--enforce-eager")
    return flags
