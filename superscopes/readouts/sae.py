"""``sae``: each read source vector's most active latents in a sparse autoencoder (SAE) at the
site and layer the grid reads, beside what the patch made of the vector."""

from __future__ import annotations

import torch

from superscopes.readouts.base import Context, Readout
from superscopes.sites import ScopeError

LATENTS = 10


class SAEDecomposition(Readout):
    """``sae``: a ``superscopes.sae.SAE`` (``sae.load`` reads SAELens, Gemma Scope and other
    formats); without one ``prepare`` loads the model's embedded SAE. ``latents``: how many
    of the most active latents each vector lists (inactive ones left out). The vectors are
    encoded on the client: the SAE never travels with a remote request."""

    name = "sae"
    columns = ("sae_latents", "sae_activations")
    stage = "read"
    description = "the source vector's most active SAE latents and their activations"

    def __init__(self, sae=None, latents: int = LATENTS):
        self.sae, self.latents = sae, latents

    def __getstate__(self) -> dict:
        return {**self.__dict__, "sae": None}  # what ships: compute needs the vectors only

    def check(self, scope, model, target_model) -> None:
        if scope.vectors is not None:
            raise ScopeError("readout 'sae' decomposes the read source vectors; with vectors, leave it out")

    def prepare(self, plan, model, target_model) -> SAEDecomposition:
        from superscopes import sae as saes
        from superscopes.models import model_name

        sae = self.sae
        if sae is None:
            name = model_name(model)
            if name not in saes.EMBEDDED:
                raise ScopeError(
                    f"readout 'sae' needs an SAE: {name} has no embedded one (those of {', '.join(saes.EMBEDDED)}); "
                    "register(SAEDecomposition(superscopes.sae.load(PATH_OR_RELEASE, model=model)))"
                )
            sae = saes.load(name, model=model)
        layers, sites = sorted({c.layer for c in plan.cells}), list(dict.fromkeys(c.site for c in plan.cells))
        if sites != [sae.site] or layers != [sae.layer]:
            raise ScopeError(
                f"readout 'sae': {sae!r} reads {sae.site} at layer {sae.layer}; the grid reads "
                f"{', '.join(sites)} at layers {layers}: use sites=[{sae.site!r}], layers=[{sae.layer}]"
            )
        return SAEDecomposition(sae, self.latents)

    def compute(self, model, tracer, context: Context) -> tuple[torch.Tensor, ...]:
        return (context.vectors,)

    def decode(self, tokenizer, values: tuple[torch.Tensor, ...], row: int) -> dict:
        pairs = self.sae.decompose(values[0][row].float(), self.latents)
        return {"sae_latents": [i for i, _ in pairs], "sae_activations": [a for _, a in pairs]}
