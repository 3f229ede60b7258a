"""The multi-host launch scripts in entrypoints/: syntax, flags, and the commands they build.

Nothing here starts pdserve: the scripts run with ``PDSERVE_BIN`` pointing at a fake that
records its arguments, which are then parsed by pdserve's own command-line parser.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.cli import build_parser
from pdserve.protocol.wire import SECRET_ENV

ENTRYPOINTS = Path(__file__).resolve().parents[2] / "entrypoints"
SCRIPTS = sorted(ENTRYPOINTS.glob("*.sh"))
# Which pdserve subcommand each script runs (common.sh only defines functions).
SUBCOMMAND = {"gateway.sh": "gateway", "instance.sh": "instance"}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _help(subcommand: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "pdserve.cli", subcommand, "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout


def _code_flags(script: Path) -> set[str]:
    """Flags written in the script's code (comments hold vLLM examples, not pdserve flags)."""
    flags: set[str] = set()
    for line in script.read_text().splitlines():
        code = line.split("#", 1)[0] if line.lstrip().startswith("#") else line
        flags |= set(FLAG.findall(code))
    return flags - {"--help"}


def test_the_scripts_exist() -> None:
    names = {s.name for s in SCRIPTS}
    assert {"gateway.sh", "prefill.sh", "decode.sh", "instance.sh"} <= names
    assert (ENTRYPOINTS / "README.md").is_file()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax_and_strict_mode(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    if script.name != "common.sh":
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n# ")  # a usage header follows
        assert "set -euo pipefail" in text
        assert os.access(script, os.X_OK)


@pytest.mark.parametrize("name", sorted(SUBCOMMAND))
def test_every_pdserve_flag_exists(name: str) -> None:
    flags = _code_flags(ENTRYPOINTS / name)
    assert flags, "the script passes no flag at all?"
    shown = set(FLAG.findall(_help(SUBCOMMAND[name])))
    assert flags <= shown, f"not in `pdserve {SUBCOMMAND[name]} --help`: {flags - shown}"


@pytest.mark.parametrize("name", ["prefill.sh", "decode.sh", "common.sh"])
def test_wrappers_use_no_flag_of_their_own(name: str) -> None:
    assert _code_flags(ENTRYPOINTS / name) == set()


def _fake_bin(tmp_path: Path) -> tuple[Path, Path]:
    record = tmp_path / "argv"
    fake = tmp_path / "pdserve"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(0o755)
    return fake, record


def _run(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        ["bash", str(ENTRYPOINTS / script), *args],
        env=base | env,
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_gateway_script_builds_a_valid_command(tmp_path: Path) -> None:
    fake, record = _fake_bin(tmp_path)
    env = {
        "PDSERVE_BIN": str(fake),
        SECRET_ENV: "s3cret",
        "PDSERVE_PORT": "9000",
        "PDSERVE_CONTROL_PORT": "9001",
        "PDSERVE_API_KEY": "client-key",
    }
    done = _run("gateway.sh", env, "--policy", "round-robin")
    assert done.returncode == 0, done.stderr
    assert "client-key" not in done.stderr
    argv = record.read_text().splitlines()
    args, extra = build_parser().parse_known_args(argv)
    assert extra == []
    assert args.command == "gateway"
    assert (args.host, args.port, args.control_host, args.control_port) == (
        "0.0.0.0",
        9000,
        "0.0.0.0",
        9001,
    )
    assert args.api_key == "client-key" and args.policy == "round-robin"


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_instance_scripts_build_a_valid_command(tmp_path: Path, role: str) -> None:
    fake, record = _fake_bin(tmp_path)
    env = {
        "PDSERVE_BIN": str(fake),
        SECRET_ENV: "s3cret",
        "PDSERVE_CONTROL_ADDRESS": "10.0.0.1:7000",
        "PDSERVE_ADVERTISE_HOST": "10.0.0.2",
        "PDSERVE_PORT": "8200",
        "PDSERVE_MODEL": "/models/m",
        "PDSERVE_KV_PORT": "9100",
    }
    done = _run(f"{role}.sh", env, "--kv-cache-gib", "4", "--max-num-seqs", "8")
    assert done.returncode == 0, done.stderr
    args, extra = build_parser().parse_known_args(record.read_text().splitlines())
    assert args.command == "instance" and args.role == role
    assert args.control_address == "tcp://10.0.0.1:7000"
    assert (args.host, args.port, args.advertise_host) == ("0.0.0.0", 8200, "10.0.0.2")
    assert (args.model, args.kv_port, args.kv_cache_gib) == ("/models/m", 9100, 4.0)
    assert not hasattr(args, "instance_id") and not hasattr(args, "control_port")
    assert extra == ["--max-num-seqs", "8"]  # what pdserve instance hands to vLLM


def test_instance_script_keeps_a_tcp_url_and_takes_any_role(tmp_path: Path) -> None:
    fake, record = _fake_bin(tmp_path)
    env = {
        "PDSERVE_BIN": str(fake),
        SECRET_ENV: "s3cret",
        "PDSERVE_CONTROL_ADDRESS": "tcp://gw:7000",
        "PDSERVE_ADVERTISE_HOST": "h",
        "PDSERVE_INSTANCE_ID": "both-0",
    }
    assert _run("instance.sh", env, "both").returncode == 0
    args, _ = build_parser().parse_known_args(record.read_text().splitlines())
    assert (args.role, args.control_address, args.instance_id) == (
        "both",
        "tcp://gw:7000",
        "both-0",
    )


@pytest.mark.parametrize(
    ("script", "env", "args", "message"),
    [
        ("gateway.sh", {}, (), SECRET_ENV),
        ("decode.sh", {"PDSERVE_CONTROL_ADDRESS": "gw:7000"}, (), SECRET_ENV),
        ("prefill.sh", {SECRET_ENV: "s"}, (), "PDSERVE_CONTROL_ADDRESS"),
        (
            "instance.sh",
            {SECRET_ENV: "s", "PDSERVE_CONTROL_ADDRESS": "gw:7000"},
            ("primary",),
            "ROLE",
        ),
    ],
)
def test_scripts_refuse_an_incomplete_setup(
    tmp_path: Path, script: str, env: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    fake, record = _fake_bin(tmp_path)
    done = _run(script, {"PDSERVE_BIN": str(fake), **env}, *args)
    assert done.returncode != 0
    assert message in done.stderr
    assert not record.exists()


@pytest.mark.parametrize("script", ["gateway.sh", "prefill.sh", "decode.sh", "instance.sh"])
def test_help_prints_the_usage_header(script: str) -> None:
    done = _run(script, {}, "--help")
    assert done.returncode == 0
    assert "PDSERVE_CLUSTER_SECRET" in done.stdout and "Environment" in done.stdout
