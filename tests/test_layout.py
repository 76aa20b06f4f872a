"""Layout: no import cycles through the command line, recipes installed under the package's name."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports(path: Path) -> set[str]:
    """Every superscopes module ``path`` imports, at any depth (function-level imports included)."""
    found, tree = set(), ast.parse(path.read_text())
    for guard in [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]:
        guard.body = []  # type-checking imports never run
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("superscopes"):
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("superscopes")}
    return found


def module_graph() -> dict[str, set[str]]:
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "superscopes").rglob("*.py")}  # fmt: skip
    return {name: imports(path) & set(files) for name, path in files.items()}


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo += graph.get(node, set())
    return False


def test_the_app_and_the_command_line_do_not_import_each_other():
    graph = module_graph()
    assert not reaches(graph, "superscopes.app.server", "superscopes.cli"), "server -> ... -> cli"
    assert "superscopes.parsing" in graph["superscopes.app.server"] and "superscopes.parsing" in graph["superscopes.cli"]
