"""The readout interface: what a grid reads out of its passes, and the columns it adds to the frame."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

# The methods that run on the client only; a readout may import anything inside them.
CLIENT_METHODS = ("check", "prepare", "decode", "annotate")


@dataclass(frozen=True)
class Context:
    """What a readout is given inside a trace."""

    top_k: int  # the scope's top_k
    fed: int = 0  # patch stage: tokens the pass feeds, which a generate pass returns before the new ones
    vectors: torch.Tensor | None = None  # read stage: the pass's read vectors [n, d]; patch: each row's source vector
    positions: torch.Tensor | None = None  # patch stage: the token column each batch row's vector is written at


class Readout:
    """One kind of readout of a grid, registered by ``name`` (``superscopes.readouts.register``).

    ``compute`` runs inside the grid's traces, locally and on NDIF: the module a readout is
    defined in ships by value with a remote request, so it may import only what NDIF allows
    (torch, nnsight, ``superscopes.ops``/``sites``) except inside the methods that run on the
    client only: ``check``, ``prepare``, ``decode`` and ``annotate``.

    - ``stage``: ``"patch"``: in each patched pass, after the grid's writes, one value per
      batch row (cell); ``"read"``: in the read pass, one value per read vector (a cell gets
      the value of the vector it patches); ``"frame"``: on the client, after the grid, from
      its finished frame (``annotate``; it may run passes of its own, but never ships).
    - ``primary``: a readout that fills ``output``/``output_ids``, chosen by ``Scope.output``
      (exactly one per grid, computed in the patched rows' own invoke); any other is chosen
      by ``Scope.readouts`` and runs in an invoke of its own over the whole batch, so its
      module accesses need not follow the primary's in forward order.
    - ``generates``: the patched pass is ``model.generate`` (else one forward that keeps
      only the last position's logits).
    - ``columns``: the frame columns ``decode`` returns.
    """

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]
    stage: ClassVar[Literal["read", "patch", "frame"]] = "patch"
    primary: ClassVar[bool] = False
    generates: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def check(self, scope, model, target_model) -> None:
        """Refuse (``ScopeError``) a scope this readout cannot run with, before any forward pass."""

    def prepare(self, plan, model, target_model) -> Readout:
        """On the client, once the grid is planned (``plan``: its scope and cells) and before its
        passes: this readout with what it needs loaded or fitted (an SAE, a lens's maps).
        Default: itself."""
        return self

    def compute(self, model, tracer, context: Context) -> tuple[torch.Tensor, ...]:
        """Inside the trace: tensors whose first dimension is the batch rows (patch stage) or
        the read vectors (read stage); the grid saves them."""
        raise NotImplementedError

    def decode(self, tokenizer, values: tuple[torch.Tensor, ...], row: int) -> dict:
        """On the client: the ``columns`` of one batch row (patch stage) or read vector (read
        stage) from what ``compute`` returned; ``tokenizer`` is the one of the model it ran in."""
        raise NotImplementedError

    def annotate(self, model, target_model, scope, frame, remote: bool | str, vectors) -> dict[str, list]:
        """Frame stage, on the client: the ``columns``, one value per row of the grid's finished
        ``frame`` (the rows of ``superscopes.run``, in grid order). ``remote``: where any passes
        of its own run; ``vectors()``: each row's source vector ``[rows, d]`` (read again when
        the grid read them: call it only if needed)."""
        raise NotImplementedError


# The registry: the grid, the command line, the recipes and the explorer know readouts only
# through it. Here, beside the interface, so that the grid needs nothing of the readouts
# themselves (``superscopes.readouts`` registers the built-in ones).
REGISTRY: dict[str, Readout] = {}


def register(readout: Readout) -> Readout:
    """Make ``readout`` available by its name to ``Scope.output`` (a primary readout) or
    ``Scope.readouts`` (any other), the command line's ``--readout`` and ``available``; a
    readout registered under a name already taken replaces it."""
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
