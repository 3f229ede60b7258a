"""One logging setup for pdserve code, wherever it runs (also inside vLLM's processes).

vLLM configures only its own ``vllm`` logger, so without this the connector's messages in
EngineCore and worker processes would be lost or printed bare.
"""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(levelname)s %(asctime)s.%(msecs)03d [%(name)s] %(message)s"


def get_logger(name: str) -> logging.Logger:
    root = logging.getLogger("pdserve")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%m-%d %H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("PDSERVE_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return logging.getLogger(name)
