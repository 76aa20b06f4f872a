"""Every site of every architecture reads what HF itself computes.

References are independent of nnsight: HF's ``output_hidden_states`` for the residual
sites, and plain torch forward hooks on the HF modules for the updates and the MLP input.
A decomposition check ties them together: resid_post = resid_pre + attn_out + mlp_out."""

from __future__ import annotations

import nnsight
import pytest
import torch

from superscopes import ops
from superscopes.sites import SITE_NAMES, UnsupportedArchitectureError, architecture_of

from .conftest import ARCHITECTURES

PROMPTS = ["Diana, Princess of Wales", "The quick brown fox jumps over the lazy dog"]

# Module whose output (or, for mlp_in, input) is the site, by HF module name: written
# independently of superscopes.sites, from reading each architecture's HF source.
HOOKED = {
    "llama": ("model.layers.{}.self_attn", "model.layers.{}.mlp", "model.layers.{}.mlp"),
    "gemma": ("model.layers.{}.post_attention_layernorm", "model.layers.{}.mlp", "model.layers.{}.post_feedforward_layernorm"),
    "gpt2": ("transformer.h.{}.attn", "transformer.h.{}.mlp", "transformer.h.{}.mlp"),
    "gpt_neox": ("gpt_neox.layers.{}.attention", "gpt_neox.layers.{}.mlp", "gpt_neox.layers.{}.mlp"),
}  # fmt: skip
FAMILY = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma2": "gemma",
          "gemma3_text": "gemma", "gpt2": "gpt2", "gpt_neox": "gpt_neox"}  # fmt: skip


def hf_reference(model, layer: int, prompts: list[str]) -> dict[str, torch.Tensor]:
    hf = model._module
    batch = model.tokenizer(prompts, return_tensors="pt", padding=True)
    # nnsight supplies mask-derived position ids for left-padded rows; do the same here.
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    attn_name, mlp_in_name, mlp_out_name = (n.format(layer) for n in HOOKED[FAMILY[model.config.model_type]])
    captured: dict[str, torch.Tensor] = {}

    def first(x):
        return (x[0] if isinstance(x, tuple) else x).clone()

    modules = dict(hf.named_modules())
    hooks = [
        modules[attn_name].register_forward_hook(lambda m, i, o: captured.__setitem__("attn_out", first(o))),
        modules[mlp_in_name].register_forward_pre_hook(lambda m, i: captured.__setitem__("mlp_in", first(i))),
        modules[mlp_out_name].register_forward_hook(lambda m, i, o: captured.__setitem__("mlp_out", first(o))),
    ]
    try:
        out = hf(**batch, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    captured["resid_pre"] = out.hidden_states[layer]
    captured["resid_post"] = out.hidden_states[layer + 1]
    return captured


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_site_matches_hf(tiny_models, arch):
    model = tiny_models[arch]
    layer = 1  # not the last block: HF's last hidden state has the final norm applied
    with model.trace(PROMPTS):
        values = nnsight.save({site: ops.activation(model, site, layer).clone() for site in SITE_NAMES})
    reference = hf_reference(model, layer, PROMPTS)
    mask = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)["attention_mask"].bool()
    for site in SITE_NAMES:
        torch.testing.assert_close(values[site][mask], reference[site][mask], atol=1e-5, rtol=1e-4, msg=site)
    # The updates add up to the residual stream (GPT-NeoX adds them in parallel; so do the others, in sum).
    recomposed = values["resid_pre"] + values["attn_out"] + values["mlp_out"]
    torch.testing.assert_close(recomposed[mask], values["resid_post"][mask], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_read_picks_rows_and_positions(tiny_models, arch):
    model = tiny_models[arch]
    with model.trace(PROMPTS):
        full = ops.activation(model, "mlp_out", 2).clone().save()
        last = ops.read(model, "mlp_out", 2, -1).save()
        picked = ops.read(model, "mlp_out", 2, torch.tensor([3, 5]), torch.tensor([1, 0])).save()
    torch.testing.assert_close(last, full[:, -1])
    torch.testing.assert_close(picked, torch.stack([full[1, 3], full[0, 5]]))


def test_smollm2_sites_match_hf(smollm2):
    layer = 4
    with smollm2.trace(PROMPTS):
        values = nnsight.save({site: ops.activation(smollm2, site, layer).clone() for site in SITE_NAMES})
    reference = hf_reference(smollm2, layer, PROMPTS)
    mask = smollm2.tokenizer(PROMPTS, return_tensors="pt", padding=True)["attention_mask"].bool()
    for site in SITE_NAMES:
        torch.testing.assert_close(values[site][mask], reference[site][mask], atol=1e-4, rtol=1e-4, msg=site)


def test_unsupported_architecture_names_the_supported_ones():
    class Config:
        model_type = "bloom"

    class Model:
        config = Config()

    with pytest.raises(UnsupportedArchitectureError, match="'bloom' is not supported; supported: gemma2, gemma3_text"):
        architecture_of(Model())
