"""What every ``pdserve bench`` subcommand shares: flags made from its settings model, and how
it runs as ``pdserve bench NAME`` or as ``python -m benchmark.MODULE``.

A benchmark module offers ``BENCH``, a ``Bench``: its settings model, whose fields are its
flags (``pdserve.settings.add_arguments``; a list field takes several values, ``json_out`` is
``--json``), and its command, ``(settings, unknown arguments, argv) -> exit status``.
``pdserve.cli`` registers the subcommands from one table of module names; benchmark never
imports the cli.

Benchmarks of a pdserve cluster that they start (or find at ``--url``) build their settings on
``ClusterBenchSettings``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, get_args

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pdserve.settings import _unwrap_optional, add_arguments, from_args
from pdserve.workload.workloads import BenchRequest, WorkloadSettings, synthetic_requests

S = TypeVar("S", bound=BaseModel)
C = TypeVar("C", bound="ClusterBenchSettings")
Result = dict[str, Any]
# A benchmark that fails this way is reported in a line, not a traceback.
RUN_ERRORS = (aiohttp.ClientError, OSError, RuntimeError, TimeoutError, ValueError)
JSON_FIELD = "json_out"  # its flag is --json
Parser = argparse.ArgumentParser | argparse._ArgumentGroup


class ClusterBenchSettings(BaseModel):
    """Fixed-length requests with random prompts; where the cluster is, or how the benchmark
    starts one; what it writes."""

    model_config = ConfigDict(extra="forbid")

    prompt_tokens: int = Field(128, ge=1, description="prompt length of every request")
    output_tokens: int = Field(64, ge=1, description="tokens generated per request")
    url: str | None = Field(
        None, description="a running gateway (default: start pdserve serve with the other flags)"
    )
    api_key: str | None = Field(None, description="the gateway's --api-key, if it has one")
    log_dir: str | None = Field(
        None, description="logs of the started cluster (default: a temp dir)"
    )
    start_timeout_s: float = Field(900.0, gt=0, description="seconds to wait for the cluster")
    request_timeout_s: float = Field(600.0, gt=0, description="limit on one request")
    seed: int = Field(0, description="seed of the random prompts (and arrival times)")
    progress: bool = Field(True, description="progress on stderr")
    json_out: str | None = Field(None, description="write the result as JSON to this file")

    def fixed_requests(self, count: int, seed: int) -> list[BenchRequest]:
        """``count`` requests of the set lengths, with random prompts drawn from ``seed``: fresh
        prompts, so that vLLM's prefix cache cannot hide any work."""
        workload = WorkloadSettings(
            workload="fixed",
            num_requests=max(count, 1),
            input_len=self.prompt_tokens,
            output_len=self.output_tokens,
            max_context=self.prompt_tokens + self.output_tokens,
            seed=seed,
        )
        return synthetic_requests(workload)[:count]


def add_settings_arguments(
    parser: Parser,
    model: type[BaseModel],
    exclude: Collection[str] = (),
    list_fields: Sequence[str] = (),
) -> None:
    """A flag for every field of ``model`` but ``exclude``; ``list_fields`` (lists, or lists
    or None) take several values; ``json_out`` is ``--json PATH``."""
    add_arguments(parser, model, exclude={*exclude, *list_fields, JSON_FIELD})
    for name in list_fields:
        if name in exclude:
            continue
        field = model.model_fields[name]
        (item,) = get_args(_unwrap_optional(field.annotation))
        default = (
            "" if field.default is None else f" (default: {' '.join(map(str, field.default))})"
        )
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            nargs="+",
            type=item,
            default=argparse.SUPPRESS,
            metavar={float: "X", int: "N"}.get(item, "TEXT"),
            help=f"{field.description}{default}",
        )
    if JSON_FIELD in model.model_fields and JSON_FIELD not in exclude:
        parser.add_argument(
            "--json",
            dest=JSON_FIELD,
            default=argparse.SUPPRESS,
            metavar="PATH",
            help=model.model_fields[JSON_FIELD].description,
        )


def write_json(path: str | None, result: dict[str, Any]) -> None:
    """``result`` to ``path`` (folders made), if there is one."""
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))


def report_cluster_bench(
    name: str,
    settings: C,
    extra: Sequence[str],
    run: Callable[[C, Sequence[str]], Result],
    describe: Callable[[Result], str],
    ok: Callable[[Result], bool],
) -> int:
    """Runs a cluster benchmark (``extra``: arguments for the cluster it starts) and prints its
    report and JSON file; exit status 2 for arguments that nothing would take (``--url``), 1
    when it failed or ``ok`` says the result does not pass."""
    if extra and settings.url:
        print(f"{name}: with --url no cluster is started; unused: {extra}", file=sys.stderr)
        return 2
    try:
        result = run(settings, extra)
    except RUN_ERRORS as error:
        print(f"{name} failed: {error}", file=sys.stderr)
        return 1
    print(describe(result))
    if settings.json_out:
        print(settings.json_out)
    return 0 if ok(result) else 1


@dataclass(frozen=True)
class Bench(Generic[S]):
    """A ``pdserve bench`` subcommand: its settings model and what runs it."""

    settings: type[S]
    command: Callable[[S, Sequence[str], Sequence[str]], int]
    exclude: tuple[str, ...] = ()
    list_fields: tuple[str, ...] = ()

    def add_arguments(self, parser: Parser) -> None:
        add_settings_arguments(parser, self.settings, self.exclude, self.list_fields)

    def settings_from_args(self, namespace: argparse.Namespace) -> S:
        return from_args(self.settings, namespace)

    def main(self, prog: str, description: str, argv: Sequence[str] | None = None) -> int:
        """``python -m ...``: the flags of the settings; unknown arguments go to the command."""
        parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
        self.add_arguments(parser)
        args = list(sys.argv[1:] if argv is None else argv)
        namespace, extra = parser.parse_known_args(args)
        try:
            settings = self.settings_from_args(namespace)
        except ValidationError as error:
            parser.error(str(error))
        return self.command(settings, extra, [*prog.split(), *args])
