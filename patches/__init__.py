"""Changes to vLLM that its extension points cannot make, pinned to vLLM 0.32.0.

Each patch is a module with ``TARGET`` (what it changes), ``PINNED_SOURCE`` (a digest of the
code it was written against; ``tests/unit/test_patches.py`` fails when vLLM's code moves), and
``apply()``. pdserve's ``vllm.general_plugins`` plugin (``pdserve.instance.plugin``) applies the
patches named in ``$PDSERVE_VLLM_PATCHES`` in every vLLM process; ``pdserve instance`` sets that
variable, so a plain ``vllm serve`` in the same environment stays unpatched.

This folder is installed as the package ``pdserve.patches``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
from types import ModuleType

PATCHES = ("mq_busy_loop",)
ENV = "PDSERVE_VLLM_PATCHES"


def module(name: str) -> ModuleType:
    if name not in PATCHES:
        raise ValueError(f"unknown vLLM patch {name!r}; known: {', '.join(PATCHES)}")
    return importlib.import_module(f"pdserve.patches.{name}")


def source_digest(obj: object) -> str:
    """Digest of an object's source, normalized through the AST (blind to comments)."""
    tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(obj)))  # type: ignore[arg-type]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


def apply(names: list[str]) -> list[str]:
    """Applies the named patches (idempotent); returns those applied."""
    applied = []
    for name in names:
        if name and module(name).apply():
            applied.append(name)
    return applied
