"""The docs name files that exist: the architecture page's map, and every repository path the manuals cite."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A repository path in backticks: starts at a top-level folder of the repository, or is a file at its root.
PATH = re.compile(r"`((?:src|tests|recipes|docs|bench|data)/[^`\s*<>{}]+|Makefile|pyproject\.toml)`")
# Paths that the docs name as what a command writes, not what the repository holds.
WRITTEN = ("bench/results/", "bench/.venv")


def cited_paths(doc: Path) -> list[str]:
    """Repository paths cited in a Markdown file (a `file.py::test` citation counts as its file)."""
    paths = []
    for match in PATH.finditer(doc.read_text()):
        path = match.group(1).split("::")[0].rstrip(".,:;)")
        if not path.startswith(WRITTEN):
            paths.append(path)
    return paths


def test_architecture_page_names_only_paths_that_exist() -> None:
    doc = REPO / "docs" / "architecture.md"
    paths = cited_paths(doc)
    assert len(paths) >= 40  # the map: if the pattern stopped matching, this test would pass on nothing
    missing = sorted({p for p in paths if not (REPO / p).exists()})
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_architecture_map_covers_every_package() -> None:
    text = (REPO / "docs" / "architecture.md").read_text()
    packages = [p.name for p in (REPO / "src" / "instruct_tune").iterdir() if (p / "__init__.py").is_file()]
    missing = [name for name in packages if f"src/instruct_tune/{name}/" not in text]
    assert not missing, f"packages the architecture page does not place: {missing}"


@pytest.mark.parametrize("doc", ["README.md", "docs/stages.md", "docs/benchmarks.md"])
def test_manuals_cite_paths_that_exist(doc: str) -> None:
    paths = cited_paths(REPO / doc)
    missing = sorted({p for p in paths if not (REPO / p).exists()})
    assert not missing, f"{doc} names paths that do not exist: {missing}"


def test_readme_is_a_manual_not_a_notebook() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    assert not re.search(r"\bsession \d+\b|\bcommit [0-9a-f]{7}\b", readme, re.IGNORECASE)


def _resolves(dotted: str) -> bool:
    """Whether `instruct_tune.a.b` is a module, or an attribute of the longest module prefix."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


@pytest.mark.parametrize("doc", ["README.md", "docs/stages.md", "docs/architecture.md", "docs/benchmarks.md"])
def test_docs_name_modules_that_exist(doc: str) -> None:
    text = (REPO / doc).read_text()
    names = {m.rstrip(".") for m in re.findall(r"(?<![.\w])instruct_tune(?:\.\w+)+\.?", text)}
    assert not [n for n in sorted(names) if not _resolves(n)], f"{doc}: stale module names"
