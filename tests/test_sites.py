"""Every site of every architecture reads what HF itself computes.

References are independent of nnsight: HF's ``output_hidden_states`` for the residual
sites, and plain torch forward hooks on the HF modules for the updates and the MLP input.
A decomposition check ties them together: resid_post = resid_pre + attn_out + mlp_out.

The eight architectures of conftest run everywhere; the ones below (added for issue 15) and
the architectures whose sites are inferred by structure are built here."""

from __future__ import annotations

import nnsight
import pytest
import torch
import transformers as T
from nnsight.modeling.transformers import TransformersModel

from superscopes import ops
from superscopes.sites import ARCHITECTURES as TABLE
from superscopes.sites import SITE_NAMES, UnsupportedArchitectureError, architecture_of, hidden_size, infer_architecture

from .conftest import _SMALL, ARCHITECTURES, VOCAB

_MOE = dict(num_hidden_layers=3, num_key_value_heads=2, num_experts_per_tok=2, **_SMALL)
MORE_CONFIGS = {
    "gptj": lambda: T.GPTJConfig(
        n_layer=3, n_embd=64, n_head=4, rotary_dim=8, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0
    ),
    "phi3": lambda: T.Phi3Config(num_hidden_layers=3, num_key_value_heads=2, pad_token_id=0, **_SMALL),
    "olmo2": lambda: T.Olmo2Config(num_hidden_layers=3, num_key_value_heads=2, pad_token_id=0, **_SMALL),
    "mixtral": lambda: T.MixtralConfig(num_local_experts=4, **_MOE),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(
        num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64, **_MOE
    ),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=32, head_dim=16, **_MOE),
    "gpt_oss": lambda: T.GptOssConfig(num_local_experts=4, head_dim=16, **_MOE),
    "deepseek_v3": lambda: T.DeepseekV3Config(
        n_routed_experts=4,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        **dict(_MOE, num_key_value_heads=4),
    ),
    # Falcon-7B style: attention and MLP read the same normalised input, added in parallel.
    "falcon": lambda: T.FalconConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB),
    # The multimodal checkpoints (Gemma3ForConditionalGeneration): a tiny vision tower too.
    "gemma3": lambda: T.Gemma3Config(
        text_config=dict(num_hidden_layers=3, num_key_value_heads=2, head_dim=16, **_SMALL),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
    ),
}
# Not in the site table: their sites come from superscopes.sites.infer_architecture.
INFERRED_CONFIGS = {
    "olmo": lambda: T.OlmoConfig(num_hidden_layers=3, num_key_value_heads=2, pad_token_id=0, **_SMALL),
    "stablelm": lambda: T.StableLmConfig(num_hidden_layers=3, num_key_value_heads=2, **_SMALL),
    "olmo3": lambda: T.Olmo3Config(num_hidden_layers=3, num_key_value_heads=2, pad_token_id=0, **_SMALL),
    "smollm3": lambda: T.SmolLM3Config(num_hidden_layers=3, num_key_value_heads=2, pad_token_id=0, **_SMALL),
}
BUILT_HERE = {**MORE_CONFIGS, **INFERRED_CONFIGS}


@pytest.fixture(scope="module")
def more_models(tokenizer) -> dict[str, TransformersModel]:
    built = {}
    for arch, make in BUILT_HERE.items():
        torch.manual_seed(0)
        hf = T.AutoModelForCausalLM.from_config(make()).eval()
        built[arch] = TransformersModel(hf, tokenizer=tokenizer)
    return built


@pytest.fixture
def any_model(request, tiny_models, more_models) -> TransformersModel:
    arch = request.param
    return tiny_models[arch] if arch in tiny_models else more_models[arch]


PROMPTS = ["Diana, Princess of Wales", "The quick brown fox jumps over the lazy dog"]

# Module whose output (or, for mlp_in, input) is the site, by HF module name: written
# independently of superscopes.sites, from reading each architecture's HF source.
HOOKED = {
    "llama": ("model.layers.{}.self_attn", "model.layers.{}.mlp", "model.layers.{}.mlp"),
    "gemma": (
        "model.layers.{}.post_attention_layernorm",
        "model.layers.{}.mlp",
        "model.layers.{}.post_feedforward_layernorm",
    ),
    "gemma3_multimodal": (
        "model.language_model.layers.{}.post_attention_layernorm",
        "model.language_model.layers.{}.mlp",
        "model.language_model.layers.{}.post_feedforward_layernorm",
    ),
    "gpt2": ("transformer.h.{}.attn", "transformer.h.{}.mlp", "transformer.h.{}.mlp"),
    "gpt_neox": ("gpt_neox.layers.{}.attention", "gpt_neox.layers.{}.mlp", "gpt_neox.layers.{}.mlp"),
    "falcon": ("transformer.h.{}.self_attention", "transformer.h.{}.mlp", "transformer.h.{}.mlp"),
}
# Mixture-of-experts blocks sit at .mlp and return the update (gpt-oss: (update, router scores)).
FAMILY = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "gptj": "gpt2",
    "phi3": "llama",
    "olmo2": "gemma",
    "mixtral": "llama",
    "qwen2_moe": "llama",
    "qwen3_moe": "llama",
    "gpt_oss": "llama",
    "deepseek_v3": "llama",
    "gemma3": "gemma3_multimodal",
    "olmo": "llama",
    "stablelm": "llama",
    "olmo3": "gemma",
    "smollm3": "llama",
    "falcon": "falcon",
}
EVERY_ARCHITECTURE = ARCHITECTURES + list(BUILT_HERE)


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


@pytest.mark.parametrize("any_model", EVERY_ARCHITECTURE, indirect=True)
def test_every_site_matches_hf(any_model):
    model = any_model
    layer = 1  # not the last block: HF's last hidden state has the final norm applied
    with model.trace(PROMPTS):
        values = nnsight.save({site: ops.activation(model, site, layer).clone() for site in SITE_NAMES})
    reference = hf_reference(model, layer, PROMPTS)
    mask = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)["attention_mask"].bool()
    for site in SITE_NAMES:
        torch.testing.assert_close(values[site][mask], reference[site][mask], atol=1e-5, rtol=1e-4, msg=site)
    # The updates add up to the residual stream (GPT-NeoX and GPT-J add them in parallel; so do the others, in sum).
    recomposed = values["resid_pre"] + values["attn_out"] + values["mlp_out"]
    torch.testing.assert_close(recomposed[mask], values["resid_post"][mask], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("any_model", EVERY_ARCHITECTURE, indirect=True)
def test_read_picks_rows_and_positions(any_model):
    model = any_model
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


def test_every_table_entry_is_tested():
    assert set(TABLE) <= set(ARCHITECTURES) | set(MORE_CONFIGS)


@pytest.mark.parametrize("arch", list(INFERRED_CONFIGS))
def test_architectures_outside_the_table_are_inferred(more_models, arch):
    assert arch not in TABLE
    inferred = architecture_of(more_models[arch])
    assert inferred.name == f"{arch} (inferred)"
    assert (inferred.blocks, inferred.final_norm, inferred.unembed) == ("model.layers", "model.norm", "lm_head")
    # OLMo-3 normalises each update after its module (like OLMo-2 and Gemma).
    expected = "post_feedforward_layernorm" if arch == "olmo3" else "mlp"
    assert inferred.sites["mlp_out"].module == expected


def test_multimodal_gemma3_sites_are_the_language_model(more_models):
    model = more_models["gemma3"]
    arch = architecture_of(model)
    assert arch.blocks == "model.language_model.layers" and arch.final_norm == "model.language_model.norm"
    assert not hasattr(model.config, "hidden_size") and hidden_size(model) == 64


def test_an_architecture_without_blocks_is_refused_with_the_reason():
    class Config:
        model_type = "bloom"
        num_hidden_layers = 2

    class NoBlocks(torch.nn.Module):
        config = Config()

        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(2, 2)

    with pytest.raises(
        UnsupportedArchitectureError,
        match=r"'bloom' is not in the site table \(deepseek_v3, falcon, gemma2, .*\) "
        r"and its sites cannot be inferred: no ModuleList of 2 blocks",
    ):
        infer_architecture(NoBlocks())


def test_a_block_without_attention_is_refused_naming_its_children():
    class Config:  # no layer count: the longest ModuleList is the block list
        model_type = "oddball"

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer, self.mlp = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    class Odd(torch.nn.Module):
        config = Config()

        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])

    with pytest.raises(UnsupportedArchitectureError, match="block Block has no attention .* its children: mixer, mlp"):
        infer_architecture(Odd())


@pytest.mark.parametrize("arch", list(BUILT_HERE))
def test_the_graph_runs_on_every_added_architecture(more_models, arch):
    """A grid with the shared prefix equals the whole-prompt path, and remote="local" equals local."""
    from superscopes import Scope, run

    model = more_models[arch]
    grid = dict(
        prompts=PROMPTS,
        sites=["mlp_out", "resid_post"],
        layers=[0, 2],
        alphas=[1, 4],
        target="identity",
        target_layers=["same", 1],
        output="generate",
        max_new_tokens=3,
    )
    shared = run(model, Scope(**grid), progress=False)
    assert (
        shared["output_ids"].tolist()
        == run(model, Scope(**grid, share_prefix=False), progress=False)["output_ids"].tolist()
    )
    assert (
        shared["output_ids"].tolist()
        == run(model, Scope(**grid), remote="local", progress=False)["output_ids"].tolist()
    )
