"""``python -m benchmark.compare``: ``pdserve bench compare`` without the ``pdserve`` command."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from benchmark.compare.runner import BENCH


def main(argv: Sequence[str] | None = None) -> int:
    return BENCH.main(
        "python -m benchmark.compare",
        "Starts each setup alone on this machine, measures it at every load with the same "
        "requests, stops it, and writes report.md, results.json, per-request JSON and PNG "
        "figures. Arguments pdserve does not know go to every vLLM instance.",
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
