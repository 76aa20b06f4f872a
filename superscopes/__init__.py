"""Superscopes: amplify weak features in a model's activations and patch them into a prompt
that makes the model describe them (Jacobi & Niv, 2025), plus the Patchscopes family,
written as nnsight tracing code that runs locally or on NDIF."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from superscopes import ops
from superscopes.models import DEFAULT_MODEL, list_models, load
from superscopes.scope import Grid, Scope, ScopeError, run

if TYPE_CHECKING:  # for type checkers: at run time __getattr__ imports them on first use
    from superscopes import (  # noqa: F401
        cli,
        corpus,
        env,
        inverse,
        judge,
        lens,
        metrics,
        plots,
        probe,
        prompts,
        remote,
        results,
        sae,
        sites,
    )

# Submodules loaded on first attribute access (``superscopes.judge.score``), so that
# ``import superscopes`` stays fast and does not pull in pandas plotting or the judge.
_LAZY_MODULES = (
    "cli",
    "corpus",
    "env",
    "inverse",
    "judge",
    "lens",
    "metrics",
    "plots",
    "probe",
    "prompts",
    "remote",
    "results",
    "sae",
    "sites",
)

__all__ = ["DEFAULT_MODEL", "Grid", "Scope", "ScopeError", "list_models", "load", "ops", "run", *_LAZY_MODULES]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        module = importlib.import_module(f"superscopes.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'superscopes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_MODULES))
