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
    files = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (ROOT / "superscopes").rglob("*.py")
    }
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
    assert (
        "superscopes.parsing" in graph["superscopes.app.server"] and "superscopes.parsing" in graph["superscopes.cli"]
    )


def test_the_wheel_installs_recipes_as_superscopes_recipes(tmp_path):
    """No top-level ``recipes`` package in site-packages; recipe data travels with it."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to pyproject.toml
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("superscopes", "recipes"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"superscopes"}
    assert "superscopes/recipes/token_identity.py" in names and "superscopes/recipes/data/multihop.csv" in names
    assert "superscopes/data/patchscopes/factual/country_currency.tsv" in names
    assert "superscopes/py.typed" in names  # type checkers read the package's hints
    assert "superscopes/data/patchscopes/NOTICE" in names and "superscopes/data/patchscopes/LICENSE" in names


def test_recipes_import_each_other_relatively():
    """So that they work as ``recipes.NAME`` in a checkout and ``superscopes.recipes.NAME`` installed."""
    for path in (ROOT / "recipes").glob("*.py"):
        absolute = [
            n
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "recipes"
        ]
        assert not absolute, f"{path.name} imports recipes.* absolutely"


def test_the_core_modules_have_no_import_cycle():
    """models -> remote -> scope -> models was one: the graph now ships itself to the server.
    (The package ``superscopes`` itself is left out: ``from superscopes import ops`` names it,
    but what it imports is ``superscopes.ops``.)"""
    graph = {m: deps - {"superscopes"} for m, deps in module_graph().items() if m != "superscopes"}
    cycles = sorted(m for m in graph if any(reaches(graph, n, m) for n in graph[m]))
    assert not cycles, f"modules on an import cycle: {cycles}"


def _imported_names(path: Path) -> set[str]:
    """Modules ``path`` imports, statically or through ``importlib.import_module("...")``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func).endswith("import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.add(node.args[0].value)
    return found


def _is_recipes(module: str) -> bool:
    return module.split(".")[0] == "recipes" or module.startswith("superscopes.recipes")


def test_the_core_never_imports_the_recipes():
    """The recipes configure the core, never the reverse. The one way in is the command line's
    ``superscopes recipe NAME``, which finds them by name; and the recipes import neither the
    command line nor the explorer, so even that makes no circle."""
    for path in sorted((ROOT / "superscopes").rglob("*.py")):
        wrong = {m for m in _imported_names(path) if _is_recipes(m)}
        if path.name == "cli.py":
            assert wrong == {"recipes", "superscopes.recipes"}, wrong  # recipes_package() only
            continue
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"
    for path in sorted((ROOT / "recipes").rglob("*.py")):
        upward = {m for m in _imported_names(path) if m.startswith(("superscopes.cli", "superscopes.app"))}
        assert not upward, f"{path.relative_to(ROOT)} imports {sorted(upward)}"
