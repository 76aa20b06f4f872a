"""The code NDIF runs by value imports only modules the server allows.

``remote.configure()`` registers ``ops``, ``sites``, ``graph`` and the ``readouts`` package
with nnsight, so their functions travel as source and run in NDIF's sandbox, whose importer refuses any module not
on its whitelist ("Module ... is not whitelisted"). They run there whole: every import they
make is checked (parsed with ``ast``), but for the imports inside a readout's client-only methods
(``readouts.base.CLIENT_METHODS``: they are compiled there and never called)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

from superscopes import graph, ops, readouts, scope, sites
from superscopes.readouts.base import CLIENT_METHODS

# Top-level names of the modules in NDIF's sandbox whitelist, ndif-team/ndif
# src/ndif/services/ray/nn/security/whitelist.yaml (commit 09d8624b), "modules" section.
# (An older deployment, src/services/ray/src/ray/nn/security/whitelist.yaml, allowed fewer:
# builtins, torch, collections, time, numpy, sympy, nnterp, math, einops, urllib3, typing,
# operator, pandas, enum; nnsight only through its envoys.)
NDIF_WHITELIST = frozenset(
    {
        "PIL",
        "re",
        "dataclasses",
        "builtins",
        "torch",
        "collections",
        "nnsight",
        "time",
        "numpy",
        "sympy",
        "nnterp",
        "math",
        "einops",
        "urllib3",
        "typing",
        "_operator",
        "operator",
        "pandas",
        "enum",
        "__future__",
        "diffusers",
        "transformers",
        "tqdm",
        "heapq",
        "json",
        "warnings",
        "functools",
        "_functools",
        "jinja2",
        "encodings",
        "peft",
        "pydantic",
        "argparse",
        "datasets",
        "tokenizers",
        "huggingface_hub",
        "httpcore",
        "fsspec",
        "scipy",
        "regex",
        "concurrent",
        "io",
    }
)
SHIPPED = {m.__name__: m for m in (ops, sites, graph, readouts)}
SHIPPED |= {  # every readout ships with the package (its module registered by value)
    f"superscopes.readouts.{info.name}": importlib.import_module(f"superscopes.readouts.{info.name}")
    for info in pkgutil.iter_modules(readouts.__path__)
}


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in the file names (at any depth), but
    inside a readout class's client-only methods."""
    names = set()
    tree = ast.parse(path.read_text())
    for cls in [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]:
        cls.body = [f for f in cls.body if not (isinstance(f, ast.FunctionDef) and f.name in CLIENT_METHODS)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            # ``from superscopes import ops`` imports the shipped module, not the package
            names |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in SHIPPED else node.module for a in node.names
            }
    return names


def allowed(module: str) -> bool:
    return module in SHIPPED or module.split(".")[0] in NDIF_WHITELIST


@pytest.mark.parametrize("module", list(SHIPPED.values()), ids=list(SHIPPED))
def test_modules_shipped_whole_import_only_whitelisted_modules(module):
    refused = sorted(m for m in imported_modules(Path(module.__file__)) if not allowed(m))
    assert not refused, f"{module.__name__} imports {refused}, which NDIF's sandbox refuses"


def test_a_grid_in_a_remote_session_ships_as_the_graph_alone(tiny_models):
    """A ``Grid`` pickles as a ``graph.ShippedGrid``: the client-side ``scope`` never ships."""
    from superscopes import Grid, Scope

    grid = Grid(
        tiny_models["llama"], Scope(prompts=["Diana"], sites=["resid_post"], layers=[0], alphas=[1], output="topk")
    )
    cls, args = grid.__reduce__()
    assert cls is graph.ShippedGrid and cls.__module__ in SHIPPED
    assert isinstance(args[2], graph._Work) and not hasattr(args[2], "plan")


def test_the_registered_modules_are_the_ones_checked(monkeypatch):
    import nnsight

    from superscopes.remote import configure

    registered = []
    monkeypatch.setattr(nnsight, "register", registered.append)
    monkeypatch.setenv("NDIF_HOST", "http://127.0.0.1:1")
    configure(ship=scope._shipped(scope.Scope(prompts=["x"], readouts=["lens", "relevancy"])))  # as the grid calls it
    names = {m.__name__ for m in registered}
    shipped = {"superscopes.ops", "superscopes.sites", "superscopes.graph", "superscopes.readouts.base"}
    # the grid's readouts' own modules; not relevancy's (a frame readout, run on the client)
    assert names == shipped | {"superscopes.readouts.generate", "superscopes.readouts.lens"}
    assert names <= set(SHIPPED)


def test_a_helper_library_would_be_caught(tmp_path):
    helper = tmp_path / "helper.py"
    helper.write_text("import itertools\nfrom einops import rearrange\nimport requests\n")
    assert sorted(m for m in imported_modules(helper) if not allowed(m)) == ["itertools", "requests"]


@pytest.mark.parametrize("module", list(SHIPPED.values()), ids=list(SHIPPED))
def test_shipped_code_calls_no_bare_super(module):
    """NDIF compiles each shipped function from its source alone, so a method's ``__class__``
    cell is gone and a bare ``super()`` raises "__class__ cell not found" on the server."""
    calls = [node for node in ast.walk(ast.parse(Path(module.__file__).read_text())) if isinstance(node, ast.Call)]
    bare = [c.lineno for c in calls if isinstance(c.func, ast.Name) and c.func.id == "super" and not c.args]
    assert not bare, f"{module.__name__}: bare super() on line(s) {bare}; name the base class instead"
