"""The code NDIF runs by value imports only modules the server allows.

``remote.configure()`` registers ``ops``, ``sites`` and ``scope`` with nnsight, so their
functions travel as source and run in NDIF's sandbox, whose importer refuses any module not
on its whitelist ("Module ... is not whitelisted"). ``ops`` and ``sites`` run there whole:
every import they make is checked (parsed with ``ast``). Of ``scope`` only the graph's
execution runs there; the globals those functions reach are checked."""

from __future__ import annotations

import ast
import inspect
import types
from pathlib import Path

import pytest

from superscopes import ops, scope, sites

# Top-level names of the modules in NDIF's sandbox whitelist, ndif-team/ndif
# src/ndif/services/ray/nn/security/whitelist.yaml (commit 09d8624b), "modules" section.
# (An older deployment, src/services/ray/src/ray/nn/security/whitelist.yaml, allowed fewer:
# builtins, torch, collections, time, numpy, sympy, nnterp, math, einops, urllib3, typing,
# operator, pandas, enum; nnsight only through its envoys.)
NDIF_WHITELIST = frozenset({
    "PIL", "re", "dataclasses", "builtins", "torch", "collections", "nnsight", "time", "numpy", "sympy",
    "nnterp", "math", "einops", "urllib3", "typing", "_operator", "operator", "pandas", "enum", "__future__",
    "diffusers", "transformers", "tqdm", "heapq", "json", "warnings", "functools", "_functools", "jinja2",
    "encodings", "peft", "pydantic", "argparse", "datasets", "tokenizers", "huggingface_hub", "httpcore",
    "fsspec", "scipy", "regex", "concurrent", "io",
})  # fmt: skip
SHIPPED = {"superscopes.ops": ops, "superscopes.sites": sites, "superscopes.scope": scope}
# What scope's graph runs inside a remote session (scope.run, scope.Grid.run, scope.read_vectors).
SERVER_SIDE = (scope._execute, scope._execute_reads, scope._execute_patches, scope.Grid.run)


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in the file names (at any depth)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def allowed(module: str) -> bool:
    return module in SHIPPED or module.split(".")[0] in NDIF_WHITELIST


@pytest.mark.parametrize("module", [ops, sites], ids=["ops", "sites"])
def test_modules_shipped_whole_import_only_whitelisted_modules(module):
    refused = sorted(m for m in imported_modules(Path(module.__file__)) if not allowed(m))
    assert not refused, f"{module.__name__} imports {refused}, which NDIF's sandbox refuses"


def reached_modules(function: types.FunctionType, seen: set | None = None) -> set[str]:
    """The modules of the globals a function (and the shipped functions it calls) uses."""
    seen = set() if seen is None else seen
    if function in seen:
        return set()
    seen.add(function)
    modules = set()
    codes = [function.__code__]
    while codes:
        code = codes.pop()
        codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
        for name in code.co_names:
            value = function.__globals__.get(name)
            if value is None:
                continue
            owner = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
            if owner is None:
                continue
            modules.add(owner)
            if owner in SHIPPED and inspect.isfunction(value):
                modules |= reached_modules(value, seen)
    return modules


def test_the_graph_run_on_the_server_reaches_only_whitelisted_modules():
    reached = set().union(*(reached_modules(f) for f in SERVER_SIDE))
    assert "superscopes.ops" in reached and "torch" in reached  # the walk follows the calls
    refused = sorted(m for m in reached if not allowed(m))
    assert not refused, f"the remote graph reaches {refused}, which NDIF's sandbox refuses"


def test_the_registered_modules_are_the_ones_checked(monkeypatch):
    import nnsight

    from superscopes.remote import configure

    registered = []
    monkeypatch.setattr(nnsight, "register", registered.append)
    monkeypatch.setenv("NDIF_HOST", "http://127.0.0.1:1")
    configure(ship=(scope,))  # as the graph calls it
    assert {m.__name__ for m in registered} == set(SHIPPED)


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
