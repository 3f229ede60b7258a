"""The alias distribution written for the vllm CLI is real metadata pip can handle."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from pdserve.doctor import ALIAS_INSTALLER, write_vllm_alias


def test_alias_is_found_by_importlib_metadata(tmp_path: Path) -> None:
    info = write_vllm_alias(tmp_path, "0.32.0+cpu")
    dist = next(md.distributions(name="vllm", path=[str(tmp_path)]))
    assert dist.version == "0.32.0+cpu"
    assert "cpu" in dist.version, "vLLM picks its CPU platform from this version string"
    assert (info / "INSTALLER").read_text().strip() == ALIAS_INSTALLER
    record = (info / "RECORD").read_text().splitlines()
    assert all((tmp_path / line.split(",")[0]).exists() for line in record)
