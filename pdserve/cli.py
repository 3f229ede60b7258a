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


# The bench subcommands: (name, module, help, description, usage, unknown arguments allowed).
# Each module offers BENCH (benchmark.command.Bench): its settings model, whose fields are
# the flags, and its command.
_BENCHES = (
    (
        "run",
        "benchmark.run",
        "load an OpenAI-compatible endpoint; TTFT/TPOT/ITL/goodput, JSON and plots",
        None,
        None,
        False,
    ),
    (
        "compare",
        "benchmark.compare",
        "start setups one after another (vllm-router, pdserve colocated, xPyD, xPyD "
        "with rescheduling), run the same sweep on each; report.md, JSON and plots",
        "Starts each setup alone on this machine, warms it up, measures it at "
        "every load with the same requests, stops it; all that over --repetitions passes, "
        "the order rotated each time; writes report.md (median, spread, tie per ratio), "
        "results.json, "
        "per-request JSON and PNG figures. Arguments pdserve does not know are passed to "
        "every vLLM instance of every setup.",
        "pdserve bench compare [--setups NAME ...] [--instances N] [--rate X ...] "
        "[--workload W] [--num-requests N] [--slo-ttft-ms X] [--slo-tpot-ms X] "
        "[--repetitions R] [--mixes NAME:key=value,... ...] [--candidate SETUP] "
        "[--cross-check] [--output-dir DIR] ... [vLLM args]",
        True,
    ),
    (
        "overhead",
        "benchmark.gateway_overhead",
        "TTFT and throughput through the gateway vs straight to the same instance",
        "Starts pdserve serve with one 'both' instance (or uses --url) and sends interleaved "
        "passes of the same shape to the instance and to the gateway. Arguments pdserve does "
        "not know go to the instance.",
        None,
        True,
    ),
    (
        "soak",
        "benchmark.soak",
        "minutes of Poisson load at a fraction of capacity: errors, KV leaks, memory",
        "Starts pdserve serve with the flags it does not know (or uses --url), probes "
        "capacity, loads it at --fraction for --minutes, then checks that every KV block is "
        "freed and how much each process grew.",
        None,
        True,
    ),
)


def _bench(module_name: str, args: argparse.Namespace, extra: list[str]) -> int:
    from pydantic import ValidationError

    bench = importlib.import_module(module_name).BENCH
    try:
        settings = bench.settings_from_args(args)
    except ValidationError as error:
        print(f"pdserve bench {args.bench_command}: {error}", file=sys.stderr)
        return 2
    return int(bench.command(settings, extra, sys.argv))


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks: load any OpenAI endpoint, compare setups")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, module_name, help_text, description, usage, accepts_extra in _BENCHES:
        parser = bench_sub.add_parser(
            name, help=help_text, description=description, usage=usage, allow_abbrev=False
        )
        importlib.import_module(module_name).BENCH.add_arguments(parser)
        parser.set_defaults(
            handler=functools.partial(_bench, module_name), accepts_extra=accepts_extra
        )


def _profile(args: argparse.Namespace, extra: list[str]) -> int:
    from pydantic import ValidationError

    from pdserve.settings import from_args
    from pdserve.sim.measure import ProfileSettings, command

    try:
        settings = from_args(ProfileSettings, args)
    except ValidationError as error:
        print(f"pdserve profile: {error}", file=sys.stderr)
        return 2
    return command(settings)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    from pdserve.settings import add_arguments
    from pdserve.sim.measure import ProfileSettings

    profile = sub.add_parser(
        "profile",
        help="measure a running vLLM instance's step times and write a profile for the simulator",
        description="Sends timed prefill and decode requests to a running vLLM instance (nothing "
        "is started), fits the step-time model of pdserve.sim.profile and writes a profile JSON.",
        allow_abbrev=False,
    )
    add_arguments(profile, ProfileSettings)
    profile.set_defaults(handler=_profile)


def _sim(args: argparse.Namespace, extra: list[str]) -> int:
    from pydantic import ValidationError

    from pdserve.sim.run import command
    from pdserve.sim.settings import sim_settings_from_args

    try:
        settings = sim_settings_from_args(args)
    except ValidationError as error:
        print(f"pdserve sim: {error}", file=sys.stderr)
        return 2
    status, results = command(*settings)
    if status == 0 and settings[0].plot:
        try:
            from benchmark.plots import plot_results
        except ImportError as error:  # matplotlib comes with scripts/setup.sh --bench
            print(f"pdserve sim: no plots ({error})", file=sys.stderr)
            return 1
        from pathlib import Path

        for path in plot_results(results, Path(settings[0].plot)):
            print(path)
    return status


def _add_sim(sub: argparse._SubParsersAction) -> None:
    from pdserve.sim.settings import add_sim_arguments

    sim = sub.add_parser(
        "sim",
        help="simulate a cluster (any size) running pdserve's own scheduling code",
        description="A discrete-event simulation of prefill, decode and colocated vLLM "
        "instances (step times from a profile) behind the gateway's real control plane and "
        "policies; the same summaries as pdserve bench run, per rate (docs/simulator.md).",
        allow_abbrev=False,
    )
    add_sim_arguments(sim)
    sim.set_defaults(handler=_sim)


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
    _add_profile,
    _add_sim,
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
