"""Superscopes: amplify weak features in a model's activations and patch them into a prompt
that makes the model describe them (Jacobi & Niv, 2025), plus the Patchscopes family,
written as nnsight tracing code that runs locally or on NDIF."""

from superscopes import ops
from superscopes.models import DEFAULT_MODEL, list_models, load
from superscopes.scope import Scope, ScopeError, run

__all__ = ["DEFAULT_MODEL", "Scope", "ScopeError", "list_models", "load", "ops", "run"]
__version__ = "0.1.0"
