"""Flags come from the settings models, and go back to flags unchanged."""

from __future__ import annotations

import argparse

import pytest

from pdserve.cli import build_parser
from pdserve.cluster.launcher import ServeSettings
from pdserve.gateway.settings import GatewaySettings
from pdserve.instance.settings import InstanceSettings
from pdserve.scheduler.dispatch import DispatchSettings
from pdserve.settings import add_arguments, from_args, to_argv


def parse(model: type, argv: list[str]) -> object:
    parser = argparse.ArgumentParser()
    add_arguments(parser, model)
    return from_args(model, parser.parse_args(argv))


def test_defaults_come_from_the_model() -> None:
    assert parse(DispatchSettings, []) == DispatchSettings()


def test_types_choices_and_booleans() -> None:
    settings = parse(
        InstanceSettings, ["--role", "decode", "--port", "9000", "--kv-lease-s", "2.5"]
    )
    assert settings.role == "decode" and settings.port == 9000 and settings.kv.lease_s == 2.5
    with pytest.raises(SystemExit):
        parse(InstanceSettings, ["--role", "teacher"])


def test_validation_errors_surface() -> None:
    with pytest.raises(Exception, match="greater than 0"):
        parse(GatewaySettings, ["--heartbeat-timeout-s", "0"])


@pytest.mark.parametrize(
    "model", [GatewaySettings, DispatchSettings, InstanceSettings, ServeSettings]
)
def test_round_trip_through_argv(model: type) -> None:
    original = parse(model, [])
    changed = original.model_copy(
        update={
            name: value
            for name, value in {
                "port": 9123,
                "policy": "least-requests",
                "role": "prefill",
                "decode": 3,
            }.items()
            if name in model.model_fields
        }
    )
    assert parse(model, to_argv(changed)) == changed


def _flags(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {flag for action in sub.choices[command]._actions for flag in action.option_strings}


def test_serve_shares_only_cluster_wide_instance_flags() -> None:
    args, extra = build_parser().parse_known_args(
        ["serve", "--decode", "2", "--kv-lease-s", "5", "--max-num-seqs", "8"]
    )
    assert args.decode == 2 and args.kv_lease_s == 5 and extra == ["--max-num-seqs", "8"]
    flags = _flags("serve")
    assert {"--kv-lease-s", "--on-kv-failure", "--policy", "--api-key"} <= flags
    assert (
        not {
            "--role",
            "--instance-id",
            "--cpu-cores",
            "--kv-port",
            "--control-address",
            "--scheduler",
            "--prefix-events-port",
        }
        & flags
    )


def test_unknown_arguments_are_refused_where_nothing_passes_them_on() -> None:
    from pdserve.cli import main

    with pytest.raises(SystemExit):
        main(["doctor", "--bogus"])


def test_the_old_scheduler_flag_still_works_and_warns(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.warns(DeprecationWarning, match="--control-address"):
        settings = parse(InstanceSettings, ["--scheduler", "tcp://gw:7000"])
    assert settings.control_address == "tcp://gw:7000"  # type: ignore[attr-defined]
    assert "deprecated" in capsys.readouterr().err
    assert "--scheduler" not in build_parser().format_help()


def test_nested_kv_settings_reach_every_field() -> None:
    settings = parse(
        InstanceSettings,
        ["--kv-backend", "gloo", "--kv-pair-setup-timeout-s", "5", "--kv-port", "9"],
    )
    kv = settings.kv  # type: ignore[attr-defined]
    assert (kv.backend, kv.pair_setup_timeout_s, kv.port) == ("gloo", 5.0, 9)
    assert parse(InstanceSettings, to_argv(settings)) == settings  # type: ignore[arg-type]
