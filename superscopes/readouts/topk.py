"""``topk``: the patched model's top-k next tokens and their probabilities, at the last position."""

from __future__ import annotations

import torch

from superscopes.readouts.base import Context, Readout
from superscopes.sites import ScopeError, vocab_size


class TopK(Readout):
    name = "topk"
    columns = ("output", "output_ids", "output_probs")
    primary = True
    description = "the top_k next tokens (ids and probabilities); output is the most likely one"

    def check(self, scope, model, target_model) -> None:
        vocab = vocab_size(target_model)
        top_k = scope.top_k
        if not (isinstance(top_k, int) and not isinstance(top_k, bool) and 1 <= top_k <= vocab):
            raise ScopeError(f"top_k {top_k!r} must be a whole number in 1-{vocab} (the vocabulary size)")

    def compute(self, model, tracer, context: Context) -> tuple[torch.Tensor, ...]:
        # The model's own logits (final soft-capping and logit scales included).
        top = model.output.logits[:, -1].float().softmax(-1).topk(context.top_k)
        return top.indices, top.values

    def decode(self, tokenizer, values: tuple[torch.Tensor, ...], row: int) -> dict:
        ids, probs = values[0][row].tolist(), values[1][row]
        if not torch.isfinite(probs).all():  # a NaN readout is a failed pass, never a result
            raise ScopeError(
                "gave non-finite next-token probabilities (an activation overflowed or was NaN); "
                "use smaller alphas or check the vectors"
            )
        return {"output": tokenizer.decode([ids[0]]), "output_ids": ids, "output_probs": probs.tolist()}
