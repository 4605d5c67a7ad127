"""The package's walls, read from the code's own imports (every import, those inside functions too):
what deploys (sona/) never reaches the local world (devstack/), and sona's modules import each other
without a circle, so each can be read, and loaded, after what it uses."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def module_of(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str) -> dict[str, Path]:
    return {module_of(path): path for path in (REPO / package).rglob("*.py")}


def imported(path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Every module this file imports, at any depth of its code; `from a import b` names a.b when
    that is a module of its own."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                yield submodule if submodule in known else node.module


def import_graph(package: str) -> dict[str, set[str]]:
    known = modules(package)
    return {
        name: {target for target in imported(path, known) if target in known and target != name}
        for name, path in known.items()
    }


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": set()}, []),
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_circles_finds_exactly_the_modules_that_reach_each_other(
    graph: dict[str, set[str]], expected: list[list[str]]
) -> None:
    assert circles(graph) == expected


def test_nothing_that_deploys_imports_the_local_world() -> None:
    reaching = {
        name: sorted(target for target in imported(path, {}) if target.split(".")[0] == "devstack")
        for name, path in [*modules("sona").items(), ("main", REPO / "main.py")]
    }
    assert {name: found for name, found in reaching.items() if found} == {}


def test_sona_modules_import_each_other_without_a_circle_even_inside_functions() -> None:
    assert circles(import_graph("sona")) == []


CITING = ("main.py", "README.md", "sona", "devstack", "tests", "supabase", "scripts")
CITATION = re.compile(r"(?<![\w/.-])(docs/[\w-]+\.md|[A-Z][A-Z_]*\.md)(?:,? \"([^\"]+)\")?")


def cited_pages() -> Iterator[tuple[str, str, str | None]]:
    """(citing file, page, quoted section) for every page of docs/ or design note a file names."""
    for place in CITING:
        root = REPO / place
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.suffix in (".py", ".sql", ".md") and path.is_file():
                for match in CITATION.finditer(path.read_text()):
                    section = " ".join(match.group(2).split()) if match.group(2) else None
                    yield str(path.relative_to(REPO)), match.group(1), section


def test_every_design_note_a_file_cites_is_a_page_of_the_repository() -> None:
    pages = {str(path.relative_to(REPO)): path.read_text() for path in (REPO / "docs").glob("*.md")}
    pages |= {path.name: "" for path in REPO.glob("*.md")}  # README, DEPLOYMENT, PERFORMANCE
    missing = sorted((where, page) for where, page, _ in cited_pages() if page not in pages)
    assert missing == []
    unknown_sections = sorted(
        (where, page, section)
        for where, page, section in cited_pages()
        if section and page.startswith("docs/") and f"## {section}" not in pages[page]
    )
    assert unknown_sections == []
