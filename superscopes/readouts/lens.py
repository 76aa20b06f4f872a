"""``lens``: each read source vector through the source model's final norm and unembedding (logit lens)."""

from __future__ import annotations

import torch

from superscopes import ops
from superscopes.readouts.base import Context, Readout
from superscopes.sites import ScopeError


class LogitLens(Readout):
    name = "lens"
    columns = ("lens", "lens_ids", "lens_probs")
    stage = "read"
    description = "the source vector's own logit lens (top_k ids and probabilities), beside what the patch made of it"

    def check(self, scope, model, target_model) -> None:
        if scope.vectors is not None:
            raise ScopeError("readout 'lens' (logit_lens) needs read vectors; with vectors, leave it out")

    def compute(self, model, tracer, context: Context) -> tuple[torch.Tensor, ...]:
        top = ops.unembed(model, context.vectors).softmax(-1).topk(context.top_k)
        return top.indices, top.values

    def decode(self, tokenizer, values: tuple[torch.Tensor, ...], row: int) -> dict:
        ids = values[0][row].tolist()
        return {"lens": tokenizer.decode([ids[0]]), "lens_ids": ids, "lens_probs": values[1][row].tolist()}
