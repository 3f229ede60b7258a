"""The ``pdserve`` command: the user's door to every component.

Each subcommand is two functions here: ``_add_NAME`` builds its parser from the component's
settings models, and ``_NAME`` imports the component (lazily: ``pdserve --help`` loads no
vLLM) and runs it. ``_SUBCOMMANDS`` lists them, so ``pdserve --help`` shows exactly what is
implemented. This is the top layer (docs/architecture.md): it may import any component and
``benchmark``; nothing imports it.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Callable, Sequence

from pdserve import __version__

Handler = Callable[[argparse.Namespace, list[str]], int]


def _model_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    from pdserve import bundled_model

    path = bundled_model.prepare(force=args.force)
    print(path)
    return 0


def _doctor(args: argparse.Namespace, extra: list[str]) -> int:
    from pdserve import doctor

    return doctor.main(fix=args.fix)


def _instance(args: argparse.Namespace, extra: list[str]) -> int:
    from pdserve.instance.launch import main
    from pdserve.instance.settings import InstanceSettings
    from pdserve.settings import from_args

    return main(from_args(InstanceSettings, args), extra)


def _add_instance(sub: argparse._SubParsersAction) -> None:
    from pdserve.instance.settings import InstanceSettings
    from pdserve.settings import add_arguments

    instance = sub.add_parser(
        "instance",
        help="run one vLLM instance with a role (prefill, decode, both) and join a cluster",
        description="Runs vLLM's OpenAI API server with pdserve's KV connector and load "
        "reports. Arguments pdserve does not know are passed to vLLM unchanged.",
        usage="pdserve instance [--role ROLE] [--control-address tcp://HOST:PORT] ... [vLLM args]",
        allow_abbrev=False,
    )
    add_arguments(instance, InstanceSettings)
    instance.set_defaults(handler=_instance, accepts_extra=True)


def _gateway(args: argparse.Namespace, extra: list[str]) -> int:
    from pdserve.gateway.run import serve
    from pdserve.gateway.settings import GatewaySettings
    from pdserve.scheduler.dispatch import DispatchSettings
    from pdserve.scheduler.rescheduling import ReschedulingSettings
    from pdserve.settings import from_args

    return serve(
        from_args(GatewaySettings, args),
        from_args(DispatchSettings, args),
        from_args(ReschedulingSettings, args),
    )


def _add_gateway(sub: argparse._SubParsersAction) -> None:
    from pdserve.gateway.settings import GatewaySettings
    from pdserve.scheduler.dispatch import DispatchSettings
    from pdserve.scheduler.rescheduling import ReschedulingSettings
    from pdserve.settings import add_arguments

    gateway = sub.add_parser(
        "gateway",
        help="run the OpenAI endpoint and the global scheduler; instances join it",
        allow_abbrev=False,
    )
    add_arguments(gateway.add_argument_group("gateway"), GatewaySettings)
    add_arguments(gateway.add_argument_group("dispatch policy"), DispatchSettings)
    add_arguments(gateway.add_argument_group("rescheduling (live migration)"), ReschedulingSettings)
    gateway.set_defaults(handler=_gateway)


def _serve(args: argparse.Namespace, extra: list[str]) -> int:
    from pdserve.cluster.launcher import ServeSettings, main
    from pdserve.gateway.settings import GatewaySettings
    from pdserve.instance.settings import InstanceSettings
    from pdserve.scheduler.dispatch import DispatchSettings
    from pdserve.scheduler.rescheduling import ReschedulingSettings
    from pdserve.settings import from_args

    return main(
        from_args(ServeSettings, args),
        from_args(GatewaySettings, args),
        from_args(DispatchSettings, args),
        from_args(ReschedulingSettings, args),
        from_args(InstanceSettings, args),
        extra,
    )


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from pdserve.cluster.launcher import PER_INSTANCE_FIELDS, ServeSettings
    from pdserve.gateway.settings import GatewaySettings
    from pdserve.instance.settings import InstanceSettings
    from pdserve.scheduler.dispatch import DispatchSettings
    from pdserve.scheduler.rescheduling import ReschedulingSettings
    from pdserve.settings import add_arguments

    serve = sub.add_parser(
        "serve",
        help="run a prefill/decode cluster on this machine behind one OpenAI endpoint",
        description="Starts the gateway and the instances, prints the endpoint when every "
        "instance has joined, and stops everything on Ctrl-C. Arguments pdserve does not "
        "know are passed to every vLLM instance.",
        usage="pdserve serve [--prefill N] [--decode M] [--both K] [--model M] [--port P] "
        "... [vLLM args]",
        allow_abbrev=False,
    )
    add_arguments(serve.add_argument_group("cluster"), ServeSettings)
    add_arguments(serve.add_argument_group("gateway"), GatewaySettings)
    add_arguments(serve.add_argument_group("dispatch policy"), DispatchSettings)
    add_arguments(serve.add_argument_group("rescheduling (live migration)"), ReschedulingSettings)
    add_arguments(
        serve.add_argument_group("every instance"), InstanceSettings, exclude=PER_INSTANCE_FIELDS
    )
    serve.set_defaults(handler=_serve, accepts_extra=True)


def _bench_run(args: argparse.Namespace, extra: list[str]) -> int:
    from benchmark.run import format_table, run, settings_from_args
    from pdserve import bundled_model

    settings = settings_from_args(args)
    bundled = settings.model in (None, bundled_model.MODEL_NAME)
    # Exact prompt lengths for the bundled model without asking for its path.
    if (
        settings.tokenizer is None
        and bundled
        and bundled_model.verify(bundled_model.model_dir()) is None
    ):
        settings = settings.model_copy(update={"tokenizer": str(bundled_model.model_dir())})
    result = run(settings)
    print(format_table(result))
    return 0 if all(p["summary"]["completed"] for p in result["points"]) else 1


def _bench_compare(args: argparse.Namespace, extra: list[str]) -> int:
    from pydantic import ValidationError

    from benchmark.compare import main, settings_from_args

    try:
        settings = settings_from_args(args)
    except ValidationError as error:
        print(f"pdserve bench compare: {error}", file=sys.stderr)
        return 2
    return main(settings, extra, sys.argv)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from benchmark.compare import add_compare_arguments
    from benchmark.run import add_run_arguments

    bench = sub.add_parser("bench", help="benchmarks: load any OpenAI endpoint, compare setups")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    run = bench_sub.add_parser(
        "run",
        help="load an OpenAI-compatible endpoint; TTFT/TPOT/ITL/goodput, JSON and plots",
        allow_abbrev=False,
    )
    add_run_arguments(run)
    run.set_defaults(handler=_bench_run)
    compare = bench_sub.add_parser(
        "compare",
        help="start setups one after another (vllm-router, pdserve colocated, xPyD, xPyD "
        "with rescheduling), run the same sweep on each; report.md, JSON and plots",
        description="Starts each setup alone on this machine, warms it up, measures it at "
        "every load with the same requests, stops it, and writes report.md, results.json, "
        "per-request JSON and PNG figures. Arguments pdserve does not know are passed to "
        "every vLLM instance of every setup.",
        usage="pdserve bench compare [--setups NAME ...] [--instances N] [--rate X ...] "
        "[--workload W] [--num-requests N] [--slo-ttft-ms X] [--slo-tpot-ms X] "
        "[--cross-check] [--output-dir DIR] ... [vLLM args]",
        allow_abbrev=False,
    )
    add_compare_arguments(compare)
    compare.set_defaults(handler=_bench_compare, accepts_extra=True)
    _add_reporting_benches(bench_sub)


# Benchmarks whose module offers add_*_arguments, settings_from_args and report(settings, extra).
_REPORTING_BENCHES = (
    (
        "overhead",
        "benchmark.gateway_overhead",
        "add_overhead_arguments",
        "TTFT and throughput through the gateway vs straight to the same instance",
        "Starts pdserve serve with one 'both' instance (or uses --url) and sends interleaved "
        "passes of the same shape to the instance and to the gateway. Arguments pdserve does "
        "not know go to the instance.",
    ),
    (
        "soak",
        "benchmark.soak",
        "add_soak_arguments",
        "minutes of Poisson load at a fraction of capacity: errors, KV leaks, memory",
        "Starts pdserve serve with the flags it does not know (or uses --url), probes "
        "capacity, loads it at --fraction for --minutes, then checks that every KV block is "
        "freed and how much each process grew.",
    ),
)


def _bench_report(module_name: str, args: argparse.Namespace, extra: list[str]) -> int:
    from pydantic import ValidationError

    module = importlib.import_module(module_name)
    try:
        settings = module.settings_from_args(args)
    except ValidationError as error:
        print(f"pdserve bench {args.bench_command}: {error}", file=sys.stderr)
        return 2
    return int(module.report(settings, extra))


def _add_reporting_benches(bench_sub: argparse._SubParsersAction) -> None:
    for name, module_name, adder, help_text, description in _REPORTING_BENCHES:
        parser = bench_sub.add_parser(
            name, help=help_text, description=description, allow_abbrev=False
        )
        getattr(importlib.import_module(module_name), adder)(parser)
        parser.set_defaults(
            handler=functools.partial(_bench_report, module_name), accepts_extra=True
        )


def _add_model(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="the bundled default model")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    prepare = model_sub.add_parser(
        "prepare",
        help="convert the bundled SmolLM2-135M-Instruct GGUF into a Hugging Face directory "
        "(once; later runs verify it) and print the directory",
    )
    prepare.add_argument("--force", action="store_true", help="rebuild even if the cache is intact")
    prepare.set_defaults(handler=_model_prepare)


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    doctor = sub.add_parser("doctor", help="check the vLLM installation for known traps")
    doctor.add_argument("--fix", action="store_true", help="repair what can be repaired")
    doctor.set_defaults(handler=_doctor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve",
        description="Prefill/decode disaggregated serving for vLLM.",
    )
    parser.add_argument("--version", action="version", version=f"pdserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_serve,
    _add_gateway,
    _add_instance,
    _add_bench,
    _add_model,
    _add_doctor,
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler: Handler = args.handler
    return handler(args, extra)


if __name__ == "__main__":
    sys.exit(main())
