"""pdserve's ``vllm.general_plugins`` entry point: runs in every vLLM process of this venv.

It only acts inside instances started by ``pdserve instance``, which names the patches to
apply in ``$PDSERVE_VLLM_PATCHES``; any other vLLM in the environment is left untouched.
"""

from __future__ import annotations

import os

from pdserve.logs import get_logger

logger = get_logger(__name__)


def load_plugin() -> None:
    names = [n.strip() for n in os.environ.get("PDSERVE_VLLM_PATCHES", "").split(",") if n.strip()]
    if not names:
        return
    import importlib

    # The top-level patches/ folder, installed as pdserve.patches (see setup.py).
    patches = importlib.import_module("pdserve.patches")
    applied = patches.apply(names)
    if applied:
        logger.debug("pdserve: applied vLLM patches %s in pid %d", ", ".join(applied), os.getpid())
