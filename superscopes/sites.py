"""Where each site lives in each architecture: one declarative table.

A *site* is a residual-stream-sized activation ``[batch, seq, d_model]`` at one layer:

- ``resid_pre``:  the residual stream entering block ``l`` (HF ``hidden_states[l]``).
- ``attn_out``:   the attention update block ``l`` adds to the residual stream.
- ``mlp_in``:     the MLP's input. In pre-norm models (Llama, Mistral, Qwen, Gemma,
                  GPT-2, GPT-NeoX) this is the *normalised* residual, i.e. the output of
                  the norm that precedes the MLP, not the raw residual.
- ``mlp_out``:    the MLP update block ``l`` adds to the residual stream. In Gemma and OLMo-2
                  this is the output of ``post_feedforward_layernorm`` (the MLP's output is
                  normalised again before it is added); in mixture-of-experts models
                  (Mixtral, Qwen-MoE, gpt-oss, DeepSeek) it is the whole sparse block's
                  output (routed experts plus any shared expert).
- ``resid_post``: the residual stream leaving block ``l`` (HF ``hidden_states[l + 1]``;
                  for the last block HF applies the final norm, this site does not).

In every architecture here ``resid_post = resid_pre + attn_out + mlp_out``, including the
parallel blocks of GPT-J, GPT-NeoX and Falcon (both updates are computed from the same input
and added together). OLMo-2 normalises the updates, not the inputs, so its ``mlp_in`` is the raw
residual after attention.

Models not in the table get their sites from ``infer_architecture`` (the block list and the
attention/MLP modules found by structure); ``superscopes.load`` checks the inferred sites
against HF's ``hidden_states`` before it returns such a model.

Architecture differences live here only; ``ops`` reads this table. This module is shipped to
NDIF by value: it may import only what the server allows (see tests/test_remote.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SITE_NAMES: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post")
"""Sites in the order a forward pass reaches them inside one block."""


@dataclass(frozen=True)
class SiteSpec:
    """How to reach a site from its block: ``block.<module>.<io>[index]``."""

    module: str  # dotted path below the block; "" is the block itself
    io: Literal["input", "output"]
    index: int | None = None  # element of a tuple output (attention returns (out, weights))


@dataclass(frozen=True)
class Architecture:
    name: str
    blocks: str  # dotted path of the ModuleList of blocks
    final_norm: str
    unembed: str
    sites: dict[str, SiteSpec]


_PRE_NORM_LLAMA_STYLE = {
    "resid_pre": SiteSpec("", "input"),
    "attn_out": SiteSpec("self_attn", "output", 0),
    "mlp_in": SiteSpec("mlp", "input"),
    "mlp_out": SiteSpec("mlp", "output"),
    "resid_post": SiteSpec("", "output"),
}

_LLAMA_STYLE = dict(blocks="model.layers", final_norm="model.norm", unembed="lm_head", sites=_PRE_NORM_LLAMA_STYLE)

# Gemma normalises both updates again before adding them to the residual stream.
_GEMMA_STYLE = dict(
    blocks="model.layers",
    final_norm="model.norm",
    unembed="lm_head",
    sites={
        "resid_pre": SiteSpec("", "input"),
        "attn_out": SiteSpec("post_attention_layernorm", "output"),
        "mlp_in": SiteSpec("mlp", "input"),
        "mlp_out": SiteSpec("post_feedforward_layernorm", "output"),
        "resid_post": SiteSpec("", "output"),
    },
)

# GPT-2 and GPT-J: one ModuleList ``transformer.h``; attention returns (output, weights).
_GPT2_STYLE = dict(
    blocks="transformer.h",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    sites={
        "resid_pre": SiteSpec("", "input"),
        "attn_out": SiteSpec("attn", "output", 0),
        "mlp_in": SiteSpec("mlp", "input"),
        "mlp_out": SiteSpec("mlp", "output"),
        "resid_post": SiteSpec("", "output"),
    },
)

# gpt-oss's MoE block returns (output, router scores).
_GPT_OSS = dict(_LLAMA_STYLE, sites=dict(_PRE_NORM_LLAMA_STYLE, mlp_out=SiteSpec("mlp", "output", 0)))

# Multimodal Gemma-3 (Gemma3ForConditionalGeneration): the text decoder sits under
# model.language_model; the vision tower has its own layers and is not a site.
_GEMMA3_MULTIMODAL = dict(_GEMMA_STYLE, blocks="model.language_model.layers", final_norm="model.language_model.norm")

ARCHITECTURES: dict[str, Architecture] = {
    name: Architecture(name=name, **spec)
    for name, spec in {
        "llama": _LLAMA_STYLE,
        "mistral": _LLAMA_STYLE,
        "qwen2": _LLAMA_STYLE,
        "qwen3": _LLAMA_STYLE,
        "phi3": _LLAMA_STYLE,
        # Mixture-of-experts: the sparse block sits where the MLP is; its output is mlp_out.
        "mixtral": _LLAMA_STYLE,
        "qwen2_moe": _LLAMA_STYLE,
        "qwen3_moe": _LLAMA_STYLE,
        "deepseek_v3": _LLAMA_STYLE,
        "gpt_oss": _GPT_OSS,
        "gemma2": _GEMMA_STYLE,
        "gemma3_text": _GEMMA_STYLE,
        "gemma3": _GEMMA3_MULTIMODAL,
        # OLMo-2 normalises each update after its module, like Gemma.
        "olmo2": _GEMMA_STYLE,
        "gpt2": _GPT2_STYLE,
        # GPT-J adds attention and MLP updates of the same normalised input in parallel.
        "gptj": _GPT2_STYLE,
        # Falcon's blocks return (hidden states, attention weights); with parallel_attn (7B,
        # 40B) attention and MLP read the same normalised input and are added together.
        "falcon": dict(
            _GPT2_STYLE,
            sites=dict(
                _GPT2_STYLE["sites"],
                attn_out=SiteSpec("self_attention", "output", 0),
                resid_post=SiteSpec("", "output", 0),
            ),
        ),
        # GPT-NeoX adds attention and MLP updates in parallel (use_parallel_residual).
        "gpt_neox": dict(
            _GPT2_STYLE,
            blocks="gpt_neox.layers",
            final_norm="gpt_neox.final_layer_norm",
            sites=dict(_GPT2_STYLE["sites"], attn_out=SiteSpec("attention", "output", 0)),
        ),
    }.items()
}


class UnsupportedArchitectureError(ValueError):
    pass


class ScopeError(ValueError):
    """A grid or a trace snippet that cannot run: a site, layer, position or setting that does
    not exist, named with the valid choices. Raised before any forward pass where it can be.
    Defined here, not in ``scope``, so that ``ops`` (shipped to NDIF) raises the same error."""


def architecture_of(model) -> Architecture:
    """The site table of a model (nnsight-wrapped or plain HF), from its config's model_type;
    an architecture not in the table is inferred from the module structure."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    return infer_architecture(model)


# Child names of a block, by role, as HF's decoder implementations spell them.
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")
_inferred: dict[tuple[int, str | None], Architecture] = {}  # by (id of the torch module, model_type)


def infer_architecture(model) -> Architecture:
    """Sites of a decoder-only model not in the table, found by structure: the ModuleList with
    one block per layer, each block's attention and MLP children, and the final norm beside
    the list. Raises ``UnsupportedArchitectureError`` naming what is missing."""
    root = getattr(model, "_module", model)  # an nnsight envoy wraps the torch module
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if (id(root), model_type) in _inferred:  # ops asks once per site access: walk the modules once
        return _inferred[id(root), model_type]
    text_config = getattr(config, "text_config", None) or config
    n_layers = getattr(text_config, "num_hidden_layers", None) or getattr(text_config, "n_layer", None)
    supported = ", ".join(sorted(ARCHITECTURES))

    def refuse(reason: str) -> UnsupportedArchitectureError:
        return UnsupportedArchitectureError(
            f"architecture {model_type!r} is not in the site table ({supported}) and its sites cannot be "
            f"inferred: {reason}"
        )

    if not hasattr(root, "named_modules"):
        raise refuse("it is not a torch module")
    # One block per layer; without a layer count in the config, the longest list.
    lists = [
        (name, module)
        for name, module in root.named_modules()
        if type(module).__name__ == "ModuleList" and len(module) > 0 and n_layers in (None, len(module))
    ]
    # A multimodal model also has encoder layers: prefer a list outside any vision/audio tower.
    lists.sort(key=lambda item: (any(w in item[0] for w in ("vision", "visual", "audio", "encoder")), -len(item[1])))
    if not lists:
        raise refuse(f"no ModuleList of {n_layers} blocks (config num_hidden_layers)")
    blocks_name, blocks = lists[0]
    children = dict(blocks[0].named_children())
    attention = next((n for n in _ATTENTION_NAMES if n in children), None)
    mlp = next((n for n in _MLP_NAMES if n in children), None)
    if attention is None or mlp is None:
        raise refuse(
            f"block {type(blocks[0]).__name__} has no attention ({'/'.join(_ATTENTION_NAMES)}) or "
            f"MLP ({'/'.join(_MLP_NAMES)}) child; its children: {', '.join(children)}"
        )
    parent_name = blocks_name.rpartition(".")[0]
    siblings = dict(resolve(root, parent_name).named_children())
    final_norm = next((n for n in _FINAL_NORM_NAMES if n in siblings), None)
    if final_norm is None:
        raise refuse(f"no final norm ({'/'.join(_FINAL_NORM_NAMES)}) beside {blocks_name}")
    output_embeddings = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    unembed = next(
        (n for n, m in root.named_modules() if output_embeddings is not None and m is output_embeddings), None
    )
    if unembed is None:
        raise refuse("no output embedding (get_output_embeddings)")
    # Updates normalised again before they are added (Gemma, OLMo-2 style).
    normed = "post_feedforward_layernorm" in children and "post_attention_layernorm" in children
    sites = {
        "resid_pre": SiteSpec("", "input"),
        "attn_out": SiteSpec("post_attention_layernorm", "output") if normed else SiteSpec(attention, "output", 0),
        "mlp_in": SiteSpec(mlp, "input"),
        "mlp_out": SiteSpec("post_feedforward_layernorm", "output") if normed else SiteSpec(mlp, "output"),
        "resid_post": SiteSpec("", "output"),
    }
    prefix = f"{parent_name}." if parent_name else ""
    arch = Architecture(
        name=f"{model_type} (inferred)",
        blocks=blocks_name,
        final_norm=prefix + final_norm,
        unembed=unembed,
        sites=sites,
    )
    _inferred[id(root), model_type] = arch
    return arch


def num_layers(model) -> int:
    return len(resolve(model, architecture_of(model).blocks))


def _decoder_setting(model, name: str) -> int:
    """A setting of the text decoder: multimodal configs such as Gemma-3's keep it in
    ``text_config`` and have none of their own."""
    config = model.config
    return getattr(config, name, None) or getattr(config.get_text_config(), name)


def vocab_size(model) -> int:
    """The unembedding's vocabulary size."""
    return _decoder_setting(model, "vocab_size")


def hidden_size(model) -> int:
    """d_model of the sites: the text decoder's hidden size."""
    return _decoder_setting(model, "hidden_size")


def resolve(root, dotted: str):
    """Follow a dotted attribute path ("model.layers") from a module or envoy."""
    obj = root
    for part in filter(None, dotted.split(".")):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj
