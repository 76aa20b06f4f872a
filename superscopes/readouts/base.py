"""The readout interface: what a grid reads out of its passes, and the columns it adds to the frame."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch


@dataclass(frozen=True)
class Context:
    """What a readout is given inside a trace."""

    top_k: int  # the scope's top_k
    fed: int = 0  # patch stage: tokens the pass feeds, which a generate pass returns before the new ones
    vectors: torch.Tensor | None = None  # read stage: the pass's read vectors [n, d]


class Readout:
    """One kind of readout of a grid, registered by ``name`` (``superscopes.readouts.register``).

    ``compute`` runs inside the grid's traces, locally and on NDIF: the module a readout is
    defined in ships by value with a remote request, so it may import only what NDIF allows
    (torch, nnsight, ``superscopes.ops``/``sites``). ``decode`` runs on the client.

    - ``stage``: ``"patch"``: in each patched pass, after the grid's writes, one value per
      batch row (cell); ``"read"``: in the read pass, one value per read vector (a cell gets
      the value of the vector it patches).
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
    stage: ClassVar[Literal["read", "patch"]] = "patch"
    primary: ClassVar[bool] = False
    generates: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def check(self, scope, model, target_model) -> None:
        """Refuse (``ScopeError``) a scope this readout cannot run with, before any forward pass."""

    def compute(self, model, tracer, context: Context) -> tuple[torch.Tensor, ...]:
        """Inside the trace: tensors whose first dimension is the batch rows (patch stage) or
        the read vectors (read stage); the grid saves them."""
        raise NotImplementedError

    def decode(self, tokenizer, values: tuple[torch.Tensor, ...], row: int) -> dict:
        """On the client: the ``columns`` of one batch row (patch stage) or read vector (read
        stage) from what ``compute`` returned; ``tokenizer`` is the one of the model it ran in."""
        raise NotImplementedError
