"""The grid's readouts, one file each, and the registry the grid and the command line read.

Adding a readout is one file (a ``Readout`` subclass, see ``base``) plus one ``register``
line here (or in your own code, before the grid is planned)::

    from superscopes.readouts import Readout, register

    register(MyReadout())
    superscopes.run(model, Scope(..., readouts=["my_readout"]))  # or `superscopes scope --readout my_readout`
"""

from __future__ import annotations

from superscopes.readouts.base import Context, Readout
from superscopes.readouts.generate import Generate
from superscopes.readouts.lens import LogitLens
from superscopes.readouts.topk import TopK

__all__ = ["REGISTRY", "Context", "Readout", "available", "register"]

REGISTRY: dict[str, Readout] = {}


def register(readout: Readout) -> Readout:
    """Make ``readout`` available by its name to ``Scope.output`` (a primary readout) or
    ``Scope.readouts`` (any other), the command line's ``--readout`` and ``available``."""
    if not isinstance(readout, Readout):
        raise TypeError(f"register takes a Readout instance, got {type(readout).__name__}")
    REGISTRY[readout.name] = readout
    return readout


def available() -> list[dict]:
    """The registered readouts: name, stage, whether primary, the columns it adds, description."""
    return [
        {
            "name": r.name,
            "stage": r.stage,
            "primary": r.primary,
            "columns": list(r.columns),
            "description": r.description,
        }
        for r in REGISTRY.values()
    ]


register(Generate())
register(TopK())
register(LogitLens())
