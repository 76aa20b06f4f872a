"""What superscopes is compared with, all in this process.

- ``hf_forward`` / ``hf_generate``: the plain HF model, no nnsight (the floor). Tokenisation is
  included on both sides, since an nnsight trace given text tokenises it too.
- ``trace_*``: one nnsight trace with no intervention, one read, one patch.
- ``HookScope``: the Superscopes authors' approach, written from the paper's description
  and its authors' notebooks: cache the source activations with PyTorch forward hooks, then for every
  cell register a hook on the target block that overwrites the last prompt token's residual
  output with alpha * v on the prompt pass only, and call ``generate`` once per cell.
- ``lens_site``: one nnsight trace per layer returning full-vocabulary next-token
  probabilities, the way nnterp's ``patchscope_lens`` is written (nnterp itself does not
  import under nnsight 0.8.1; see README.md).

Llama-style module paths (``model.layers[i].mlp``), as in the authors' code (Llama-2).
"""

from __future__ import annotations

import torch

from superscopes import ops


def hf_inputs(tokenizer, texts: list[str]):
    return tokenizer(texts, return_tensors="pt", padding=True)


def hf_forward(model, texts: list[str]):
    """Tokenise and run the HF model once (all positions' logits, as a plain call returns)."""
    return model._module(**hf_inputs(model.tokenizer, texts)).logits


def hf_forward_last_logits(model, texts: list[str]):
    """The same forward computing only the last position's logits (``logits_to_keep=1``)."""
    return model._module(**hf_inputs(model.tokenizer, texts), logits_to_keep=1).logits


def hf_generate(model, texts: list[str], max_new_tokens: int):
    tok = model.tokenizer
    enc = hf_inputs(tok, texts)
    out = model._module.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[:, enc["input_ids"].shape[1] :]


# ---------------------------------------------------------------- nnsight traces


def trace_none(model, texts: list[str]) -> None:
    with model.trace(texts):
        pass


def trace_read(model, texts: list[str], layer: int):
    with model.trace(texts):
        h = ops.read(model, "resid_post", layer, -1).save()
    return h


def trace_patch(model, texts: list[str], layer: int, vectors: torch.Tensor, alphas: torch.Tensor) -> None:
    """One write: every row's last token at ``layer`` becomes alpha_i * v_i (the grid's write)."""
    with model.trace(texts):
        ops.patch(model, "resid_post", layer, vectors, -1, alpha=alphas)


def nnsight_generate_patch(model, texts, layer, vectors, alphas, max_new_tokens: int):
    tok = model.tokenizer
    with model.generate(texts, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id) as tracer:
        ops.patch(model, "resid_post", layer, vectors, -1, alpha=alphas)
        ids = tracer.result[:, -max_new_tokens:].save()
    return ids


# ---------------------------------------------------------------- the authors' approach: plain hooks


def decode_until_eos(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True), ids


def _block_output(output):
    return output[0] if isinstance(output, tuple) else output


class HookScope:
    """Superscopes the way its authors wrote it: HF forward hooks, one ``generate`` per cell."""

    def __init__(self, hf_model, tokenizer):
        self.hf = hf_model
        self.tok = tokenizer
        self.blocks = hf_model.model.layers

    def cache(self, prompt: str, sites: list[str], layers: list[int], position: int = -1) -> dict:
        """One forward of the source prompt; hooks keep each (site, layer) vector at ``position``."""
        store: dict[tuple[str, int], torch.Tensor] = {}
        handles = []

        def keep(key, value):
            store[key] = value[0, position].detach().clone()

        for layer in layers:
            block = self.blocks[layer]
            if "resid_pre" in sites:  # the residual stream entering the block, HF hidden_states[l]
                handles.append(
                    block.register_forward_pre_hook(lambda m, args, l=layer: keep(("resid_pre", l), args[0]))
                )
            if "attn_out" in sites:  # the attention update (self_attn returns (out, weights))
                handles.append(
                    block.self_attn.register_forward_hook(lambda m, a, out, l=layer: keep(("attn_out", l), out[0]))
                )
            if "mlp_in" in sites:  # the normalised residual entering the MLP
                handles.append(
                    block.mlp.register_forward_pre_hook(lambda m, args, l=layer: keep(("mlp_in", l), args[0]))
                )
            if "mlp_out" in sites:  # the MLP's update to the residual stream
                handles.append(block.mlp.register_forward_hook(lambda m, a, out, l=layer: keep(("mlp_out", l), out)))
            if "resid_post" in sites:  # the block's output, HF hidden_states[l + 1]
                handles.append(
                    block.register_forward_hook(lambda m, a, out, l=layer: keep(("resid_post", l), _block_output(out)))
                )
        try:
            self.hf(**self.tok(prompt, return_tensors="pt"))
        finally:
            for handle in handles:
                handle.remove()
        return store

    def _patch_hook(self, index: int, vector: torch.Tensor, alpha: float, once: bool):
        state = {"done": False}

        def hook(module, args, output):
            if once and state["done"]:  # generated tokens run unpatched
                return None
            state["done"] = True
            _block_output(output)[:, index] = alpha * vector
            return output

        return hook

    def generate_cell(self, target: str, index: int, layer: int, vector, alpha: float, max_new_tokens: int):
        """Greedy ``generate`` with the prompt pass of block ``layer`` patched at ``index``."""
        enc = self.tok(target, return_tensors="pt")
        handle = self.blocks[layer].register_forward_hook(self._patch_hook(index, vector, alpha, once=True))
        try:
            out = self.hf.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tok.pad_token_id
            )
        finally:
            handle.remove()
        return decode_until_eos(self.tok, out[0, enc["input_ids"].shape[1] :].tolist())

    def generate_grid_shared_prefix(
        self,
        target: str,
        layers: list[int],
        vectors: torch.Tensor,
        alphas: torch.Tensor,
        max_new_tokens: int,
        batch_size: int = 64,
    ) -> list[tuple[str, list[int]]]:
        """A what-if, not a method of the paper: all rows share the target prompt up to its last
        token (the placeholder), and a patch at the last token cannot change earlier positions, so
        the prefix's KV cache is computed once (one row) and copied to every row; each row then
        runs only the placeholder token (patched, per row: ``alphas[i] * vectors[i]`` at block
        ``layers[i]``) and the generated tokens. Rows are batched ``batch_size`` at a time."""
        import copy

        from transformers import DynamicCache

        ids = self.tok(target, return_tensors="pt")["input_ids"]
        length = ids.shape[1]
        prefix = DynamicCache(config=self.hf.config)
        self.hf(input_ids=ids[:, :-1], cache=prefix, use_cache=True)
        results = []
        for start in range(0, len(layers), batch_size):
            rows = list(range(start, min(start + batch_size, len(layers))))
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(rows))
            handles = []
            for layer in sorted({layers[i] for i in rows}):
                local = [j for j, i in enumerate(rows) if layers[i] == layer]
                v = alphas[[rows[j] for j in local], None] * vectors[[rows[j] for j in local]]
                handles.append(self.blocks[layer].register_forward_hook(self._rows_hook(torch.tensor(local), v)))
            try:
                out = self.hf.generate(
                    input_ids=ids.expand(len(rows), -1),
                    attention_mask=torch.ones(len(rows), length, dtype=torch.long),
                    cache=cache,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tok.pad_token_id,
                )
            finally:
                for handle in handles:
                    handle.remove()
            results += [decode_until_eos(self.tok, row[length:].tolist()) for row in out]
        return results

    def cells_shared_prefix(
        self, source: str, target: str, cells: list[tuple], max_new_tokens: int, batch_size: int = 64
    ) -> list[tuple[str, list[int]]]:
        """``generate_grid_shared_prefix`` for (site, layer, alpha) cells: the vectors are read
        from ``source``'s last token (one cached forward), then written at block ``layer``."""
        cache = self.cache(source, sorted({c[0] for c in cells}), sorted({c[1] for c in cells}))
        vectors = torch.stack([cache[(site, layer)] for site, layer, _ in cells])
        alphas = torch.tensor([float(a) for *_, a in cells])
        return self.generate_grid_shared_prefix(
            target, [c[1] for c in cells], vectors, alphas, max_new_tokens, batch_size
        )

    @staticmethod
    def _rows_hook(rows: torch.Tensor, values: torch.Tensor):
        state = {"done": False}

        def hook(module, args, output):
            if state["done"]:  # only the first forward (the placeholder token) is patched
                return None
            state["done"] = True
            _block_output(output)[rows, -1] = values
            return output

        return hook

    def topk_cell(self, target: str, index: int, layer: int, vector, alpha: float, k: int = 10):
        """One forward with the patch; the top-k next-token ids and probabilities."""
        enc = self.tok(target, return_tensors="pt")
        handle = self.blocks[layer].register_forward_hook(self._patch_hook(index, vector, alpha, once=False))
        try:
            logits = self.hf(**enc).logits
        finally:
            handle.remove()
        top = logits[0, -1].float().softmax(-1).topk(k)
        return top.indices.tolist(), top.values.tolist()


# ---------------------------------------------------------------- nnterp-style lens: one trace per layer


def _site_value(model, site: str, layer: int):
    block = model.model.layers[layer]
    if site == "mlp_in":
        return block.mlp.input
    if site == "mlp_out":
        return block.mlp.output
    if site == "resid_post":
        return block.output
    raise ValueError(site)


def read_site(model, prompt: str, site: str, layers: list[int], position: int = -1) -> torch.Tensor:
    """One trace over the source, the site's last-token vector at every layer ``[len(layers), d]``
    (nnterp's ``get_token_activations`` with a custom ``get_activations``)."""
    with model.trace(prompt):
        vectors = [_site_value(model, site, layer)[0, position].clone() for layer in layers]
        stacked = torch.stack(vectors).save()
    return stacked


def lens_site(model, target: str, index: int, layers: list[int], latents: torch.Tensor) -> torch.Tensor:
    """nnterp ``patchscope_lens`` shape: for each layer one trace of ``n`` target rows whose
    ``index`` token at that layer's output is replaced by ``latents[layer_i, row]``; returns the
    full next-token distribution ``[n, len(layers), vocab]``."""
    n = latents.shape[1]
    probs = []
    for i, layer in enumerate(layers):
        with model.trace([target] * n):
            model.model.layers[layer].output[torch.arange(n), index] = latents[i]
            p = model.output.logits[:, -1, :].softmax(-1).cpu().save()
        probs.append(p)
    return torch.stack(probs).transpose(0, 1)
