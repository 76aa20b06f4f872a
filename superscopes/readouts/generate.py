"""``generate``: the text the patched model generates (``max_new_tokens`` tokens, greedy or sampled)."""

from __future__ import annotations

import torch

from superscopes.readouts.base import Context, Readout


class Generate(Readout):
    name = "generate"
    columns = ("output", "output_ids")
    primary = True
    generates = True
    description = "the text the patched model generates, up to the first end-of-sequence token"

    def compute(self, model, tracer, context: Context) -> tuple[torch.Tensor, ...]:
        # The new tokens follow the input (fewer than max_new_tokens when every row ended early).
        return (tracer.result[:, context.fed :],)

    def decode(self, tokenizer, values: tuple[torch.Tensor, ...], row: int) -> dict:
        ids = values[0][row].tolist()
        eos = tokenizer.eos_token_id
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        return {"output": tokenizer.decode(ids, skip_special_tokens=True), "output_ids": ids}
