"""``python -m benchmark.compare``: ``pdserve bench compare`` without the ``pdserve`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from benchmark.compare.runner import main as compare
from benchmark.compare.settings import add_compare_arguments, settings_from_args


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.compare",
        description="Starts each setup alone on this machine, measures it at every load with "
        "the same requests, stops it, and writes report.md, results.json, per-request JSON and "
        "PNG figures. Arguments pdserve does not know go to every vLLM instance.",
        allow_abbrev=False,
    )
    add_compare_arguments(parser)
    args = list(sys.argv[1:] if argv is None else argv)
    namespace, vllm_args = parser.parse_known_args(args)
    try:
        settings = settings_from_args(namespace)
    except ValidationError as error:
        parser.error(str(error))
    return compare(settings, vllm_args, ["python", "-m", "benchmark.compare", *args])


if __name__ == "__main__":
    sys.exit(main())
