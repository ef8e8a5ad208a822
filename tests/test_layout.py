"""The house's shape: lrtool's modules import each other without a circle, and none but the CLI's grows past
a size a reader can hold in their head."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "lrtool"
MOST_LINES = 400
LONGER_ALLOWED = {"cli.py", "docs.py"}  # the CLI layer: one typer command per verb, the docs generator


def modules() -> dict[str, Path]:
    """Every lrtool module by dotted name (a package by its __init__)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The lrtool modules `path` imports, wherever in the file (a function-level import is an edge too)."""
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lrtool"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                edges.add(submodule if submodule in known else node.module)
    return edges


def test_no_module_imports_itself_back_through_others():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = "open"
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                return path + [name, target]
            if target not in state:
                cycle = visit(target, path + [name])
                if cycle:
                    return cycle
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [])
            assert cycle is None, "import circle: " + " -> ".join(cycle[cycle.index(cycle[-1]) :])


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {
        str(path.relative_to(REPO)): lines
        for path in PACKAGE.rglob("*.py")
        if path.name not in LONGER_ALLOWED or path.parent != PACKAGE
        if (lines := len(path.read_text().splitlines())) > MOST_LINES
    }
    assert long == {}, f"modules over {MOST_LINES} lines: {long}"


def test_every_module_says_what_it_is():
    silent = [
        str(path.relative_to(REPO))
        for path in PACKAGE.rglob("*.py")
        if path.name != "__main__.py" and ast.get_docstring(ast.parse(path.read_text())) is None
    ]
    assert silent == [], f"modules without a docstring: {silent}"
