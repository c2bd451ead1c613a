"""The documentation stands on its own: its relative links resolve and it cites nothing outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
# [text](target) and ![alt](target); the target stops at whitespace or ')'.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Places whose text a reader of the repository (or of `--help`) sees.
CITING_TREES = ["fedsoup", "strategies", "simulations", "tests", "scripts", "benchmarks", "docs"]


def _relative_links(markdown: str) -> list[str]:
    targets = []
    for target in LINK.findall(markdown):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # URLs (http:, mailto:) and in-page anchors
        targets.append(target.split("#", 1)[0])
    return targets


def test_link_pattern_finds_relative_links_and_skips_urls():
    text = "[a](docs/x.md) ![p](img/p.png) [u](https://e.org/y.md) [s](#sec) [b](y.md#part)"
    assert _relative_links(text) == ["docs/x.md", "img/p.png", "y.md"]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    missing = [t for t in _relative_links(page.read_text()) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_design_document_exists_and_is_linked_from_the_readme():
    assert (ROOT / "docs" / "design.md").is_file()
    assert "docs/design.md" in (ROOT / "README.md").read_text()


def test_nothing_cites_the_external_specification():
    """The contract lives in docs/design.md; 'SPEC §n' would point outside the repository."""
    offenders = []
    for tree in CITING_TREES:
        for path in (ROOT / tree).rglob("*"):
            if path.suffix not in {".py", ".md", ".sh", ".toml", ".yml"} or not path.is_file():
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if re.search(r"\bSPEC\b", line) and path != Path(__file__):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}")
    for name in ["README.md", "pyproject.toml", "Makefile"]:
        if re.search(r"\bSPEC\b", (ROOT / name).read_text()):
            offenders.append(name)
    assert not offenders, offenders
