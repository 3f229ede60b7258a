"""The ``pdserve`` command: the user's door to every component.

Each subcommand lives in its own module and registers itself through ``add_parser``; this
file only wires them together, so ``pdserve --help`` lists exactly what is implemented.
"""

from __future__ import annotations

import argparse
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


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_model, _add_doctor]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler: Handler = args.handler
    return handler(args, extra)


if __name__ == "__main__":
    sys.exit(main())
