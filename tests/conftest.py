"""Marks every test by its folder: tests/unit → ``unit``, tests/integration → ``integration``."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


# Integration modules in the order they should run: those with processes of their own and no
# need of the shared ones before the shared cluster starts (seven vLLM instances at once do not
# fit in 24 GB: the OOM killer took the reference's worker), and the modules that kill instances
# last.
INTEGRATION_ORDER = [
    "test_single_instance",
    "test_prefix_routing",
    "test_adaptive_serving",
    "test_kv_transfer",
    "test_gateway",
    "test_migration",
    "test_faults",
]


def _rank(item: pytest.Item) -> tuple[int, int]:
    path = Path(str(item.fspath))
    if (HERE / "unit") in path.parents:
        return (0, 0)
    stem = path.stem
    return (
        1,
        INTEGRATION_ORDER.index(stem) if stem in INTEGRATION_ORDER else len(INTEGRATION_ORDER),
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath))
        if (HERE / "unit") in path.parents:
            item.add_marker(pytest.mark.unit)
        elif (HERE / "integration") in path.parents:
            item.add_marker(pytest.mark.integration)
    items.sort(key=_rank)  # stable: keeps the order inside each module
