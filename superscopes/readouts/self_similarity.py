"""``self_similarity``: the cosine between each row's source vector and the last block's output
at the position it was written to, in the patched pass (Kharlapenko et al.'s check that the
model still carries the patched feature at the end; ``sae.explanation_scores`` computes the
same from a teacher-forced rerun)."""

from __future__ import annotations

import torch

from superscopes import ops
from superscopes.readouts.base import Context, Readout
from superscopes.sites import ScopeError, num_layers


class SelfSimilarity(Readout):
    name = "self_similarity"
    columns = ("self_similarity",)
    description = "cosine of the source vector with the last block's output at the patched position"

    def check(self, scope, model, target_model) -> None:
        if target_model is not model:
            raise ScopeError(
                "readout 'self_similarity' compares the source vector with the target's last block: "
                "it needs the source model as the target"
            )

    def compute(self, model, tracer, context: Context) -> tuple[torch.Tensor, ...]:
        # In a generate pass this is the first forward (the prompt's), where the vector was written.
        rows = torch.arange(len(context.positions))
        final = ops.read(model, "resid_post", num_layers(model) - 1, context.positions, rows).float()
        source = context.vectors.to(final.device).float()
        return (torch.nn.functional.cosine_similarity(final, source, dim=-1),)

    def decode(self, tokenizer, values: tuple[torch.Tensor, ...], row: int) -> dict:
        return {"self_similarity": float(values[0][row])}
