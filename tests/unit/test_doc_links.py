"""Every relative link in the README and the docs points at a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
DOCUMENTS = sorted(
    {
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *ROOT.glob("*/README.md"),
        *(ROOT / "benchmark").rglob("*.md"),
    }
)


def relative_links(text: str) -> list[str]:
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor in the same page
        targets.append(target.split("#", 1)[0])
    return targets


def test_the_link_pattern_finds_links() -> None:
    text = "see [a](docs/a.md), [b](https://x.org), [c](#top), [d](../e.md#part)"
    assert relative_links(text) == ["docs/a.md", "../e.md"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document: Path) -> None:
    missing = [
        target
        for target in relative_links(document.read_text())
        if not (document.parent / target).exists()
    ]
    assert missing == []


def test_documents_named_in_the_source_exist() -> None:
    named = {
        (str(path.relative_to(ROOT)), name)
        for top in ("pdserve", "benchmark", "patches", "scripts", "entrypoints")
        for path in (ROOT / top).rglob("*")
        if path.suffix in (".py", ".sh")
        for name in re.findall(r"\bdocs/[\w.-]+\.md\b", path.read_text())
    }
    assert sorted((where, name) for where, name in named if not (ROOT / name).exists()) == []
