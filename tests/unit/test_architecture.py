"""The layer order of docs/architecture.md, checked on the source: imports only run downward.

Every ``import`` counts, also those inside functions and under ``TYPE_CHECKING``: a circle
that only type checkers follow is still a circle for the reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Lowest first; a module may import its own layer and those below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",
        (
            "pdserve",
            "pdserve.logs",
            "pdserve.settings",
            "pdserve.bundled_model",
            "pdserve.protocol",
        ),
    ),
    ("patches", ("patches",)),
    ("kv", ("pdserve.kv",)),
    ("instance", ("pdserve.instance",)),
    ("scheduler", ("pdserve.scheduler",)),
    ("gateway", ("pdserve.gateway",)),
    ("cluster", ("pdserve.cluster", "pdserve.workload", "pdserve.sim")),
    ("door", ("pdserve.cli", "pdserve.doctor", "benchmark")),
]
# The scheduler is pure policy: besides the base layer it may use no pdserve layer and no
# module that does I/O, so the simulator runs exactly the gateway's decisions.
SCHEDULER_MAY_NOT_IMPORT = ("zmq", "aiohttp", "socket", "torch", "vllm", "fastapi", "urllib")
MAX_LINES = 700


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    paths = [p for top in ("pdserve", "benchmark", "patches") for p in (ROOT / top).rglob("*.py")]
    return {_module_name(p): p for p in paths}


def _imports(name: str, path: Path, known: set[str]) -> Iterator[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module
            for alias in node.names:
                if f"{module}.{alias.name}" in known:
                    yield f"{module}.{alias.name}"


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {name: set(_imports(name, path, known)) for name, path in sources.items()}


def _layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (length of the matching prefix, layer index)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def test_every_module_has_a_layer() -> None:
    assert [m for m in _graph() if _layer_of(m) is None] == []


def test_imports_only_run_downward() -> None:
    upward = []
    for module, imports in _graph().items():
        own = _layer_of(module)
        assert own is not None
        for imported in imports:
            layer = _layer_of(imported)
            if layer is not None and layer > own:
                upward.append(f"{module} -> {imported}")
    assert upward == []


def test_benchmark_never_imports_the_cli() -> None:
    graph = _graph()
    assert [m for m in graph if m.startswith("benchmark") and "pdserve.cli" in graph[m]] == []


def test_the_scheduler_is_pure_policy() -> None:
    offending = []
    for module, imports in _graph().items():
        if not module.startswith("pdserve.scheduler"):
            continue
        for imported in imports:
            layer = _layer_of(imported)
            io = imported.split(".")[0] in SCHEDULER_MAY_NOT_IMPORT
            if io or (layer is not None and layer not in (0, _layer_of(module))):
                offending.append(f"{module} -> {imported}")
    assert offending == []


def test_no_import_circles() -> None:
    graph = _graph()
    edges = {m: {i for i in imports if i in graph and i != m} for m, imports in graph.items()}
    # A package's __init__ imported by its own modules is not a circle worth the name: only
    # the package docstring lives there.
    edges = {m: {i for i in imports if not m.startswith(i + ".")} for m, imports in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for nxt in sorted(edges[module]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert circles == []


@pytest.mark.parametrize("top", ["pdserve", "benchmark", "patches"])
def test_modules_stay_short(top: str) -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / top).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_layer_table_matches_the_document() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    for _, prefixes in LAYERS:
        for prefix in prefixes:
            if prefix == "pdserve.sim" and not (ROOT / "pdserve" / "sim").exists():
                continue
            assert f"`{prefix.replace('.', '/')}" in text or f"`{prefix}" in text, prefix
