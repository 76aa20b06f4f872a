"""Where each site lives in each architecture: one declarative table.

A *site* is a residual-stream-sized activation ``[batch, seq, d_model]`` at one layer:

- ``resid_pre``:  the residual stream entering block ``l`` (HF ``hidden_states[l]``).
- ``attn_out``:   the attention update block ``l`` adds to the residual stream.
- ``mlp_in``:     the MLP's input. In pre-norm models (Llama, Mistral, Qwen, Gemma,
                  GPT-2, GPT-NeoX) this is the *normalised* residual, i.e. the output of
                  the norm that precedes the MLP, not the raw residual.
- ``mlp_out``:    the MLP update block ``l`` adds to the residual stream. In Gemma this is
                  the output of ``post_feedforward_layernorm`` (the MLP's output is
                  normalised again before it is added).
- ``resid_post``: the residual stream leaving block ``l`` (HF ``hidden_states[l + 1]``;
                  for the last block HF applies the final norm, this site does not).

Architecture differences live here only; ``ops`` reads this table.
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

ARCHITECTURES: dict[str, Architecture] = {
    name: Architecture(name=name, **spec)
    for name, spec in {
        "llama": _LLAMA_STYLE,
        "mistral": _LLAMA_STYLE,
        "qwen2": _LLAMA_STYLE,
        "qwen3": _LLAMA_STYLE,
        "gemma2": _GEMMA_STYLE,
        "gemma3_text": _GEMMA_STYLE,
        "gpt2": dict(
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
        ),
        # GPT-NeoX adds attention and MLP updates in parallel (use_parallel_residual).
        "gpt_neox": dict(
            blocks="gpt_neox.layers",
            final_norm="gpt_neox.final_layer_norm",
            unembed="lm_head",
            sites={
                "resid_pre": SiteSpec("", "input"),
                "attn_out": SiteSpec("attention", "output", 0),
                "mlp_in": SiteSpec("mlp", "input"),
                "mlp_out": SiteSpec("mlp", "output"),
                "resid_post": SiteSpec("", "output"),
            },
        ),
    }.items()
}


class UnsupportedArchitectureError(ValueError):
    pass


def architecture_of(model) -> Architecture:
    """The site table of a model (nnsight-wrapped or plain HF), from its config's model_type."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3" and hasattr(config, "text_config"):
        model_type = "gemma3_text"
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def num_layers(model) -> int:
    return len(resolve(model, architecture_of(model).blocks))


def resolve(root, dotted: str):
    """Follow a dotted attribute path ("model.layers") from a module or envoy."""
    obj = root
    for part in filter(None, dotted.split(".")):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj
