"""The grid's readouts, one file each, and the registry the grid and the command line read.

Each runs at one stage (``Readout.stage``): inside the read pass (``lens``, ``sae``: the
source vector's own readouts), inside each patched pass (``generate`` or ``topk``, the
primary output; ``self_similarity``), or on the finished frame (``affine_lens``,
``relevancy``, ``judge``). Adding a readout is one file (a ``Readout`` subclass, see ``base``) plus one
``register`` line here (or in your own code, before the grid is planned)::

    from superscopes.readouts import Readout, register

    register(MyReadout())
    superscopes.run(model, Scope(..., readouts=["my_readout"]))  # or `superscopes scope --readout my_readout`
"""

from __future__ import annotations

from superscopes.readouts.affine_lens import AffineLens
from superscopes.readouts.base import REGISTRY, Context, Readout, available, register
from superscopes.readouts.generate import Generate
from superscopes.readouts.judge import JudgeScores
from superscopes.readouts.lens import LogitLens
from superscopes.readouts.relevancy import Relevancy
from superscopes.readouts.sae import SAEDecomposition
from superscopes.readouts.self_similarity import SelfSimilarity
from superscopes.readouts.topk import TopK

__all__ = [
    "REGISTRY",
    "AffineLens",
    "Context",
    "JudgeScores",
    "Readout",
    "SAEDecomposition",
    "available",
    "register",
]

register(Generate())
register(TopK())
register(LogitLens())
register(AffineLens())  # fits its maps on embedded text; register(AffineLens(maps)) for your own
register(SAEDecomposition())  # the model's embedded SAE; register(SAEDecomposition(sae)) for another
register(SelfSimilarity())
register(Relevancy())
register(JudgeScores())
