"""Helpers for testing the app fast: a tiny random Llama and a fake judge (no MiniLM)."""

from __future__ import annotations

import zlib

import pandas as pd


def tiny_model(seed: int = 0, name: str = "tiny-llama"):
    """A 2-layer random Llama (d=64) with SmolLM2's tokenizer, as an nnsight model labelled ``name``."""
    import torch
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from superscopes.models import resolve_path

    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=49152,
    )  # fmt: skip
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config).eval()
    hf.config._name_or_path = name  # what results and error messages call it
    tokenizer = AutoTokenizer.from_pretrained(resolve_path("smollm2-135m"))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return TransformersModel(hf, tokenizer=tokenizer)


def fake_similarity(frame: pd.DataFrame) -> pd.DataFrame:
    """A deterministic stand-in for the MiniLM judge: a number in [0, 0.6) per row."""
    values = [
        (zlib.crc32(f"{r.site}|{r.layer}|{r.alpha}|{r.position}".encode()) % 600) / 1000
        for r in frame.itertuples(index=False)
    ]
    return frame.assign(similarity=values)


def tiny_panels(model, folder, name: str = "tiny-llama", site: str = "resid_post", layer: int = 0) -> tuple:
    """A TopK SAE (128 latents, k=8) and an InverseScope generator (20 steps) for ``model`` at
    ``site``/``layer``, trained in seconds on the built-in fallback sentences and written to
    ``folder/sae`` and ``folder/generator`` (``generator.pt`` beside its ``pairs.pt``, as
    ``superscopes inverse train`` writes them): the two folders."""
    from pathlib import Path

    import torch

    from superscopes import inverse, lens
    from superscopes import sae as S
    from superscopes.corpus import FALLBACK

    folder = Path(folder)
    texts = list(FALLBACK)
    acts = lens.collect(model, texts, site, [layer], "text")[layer]
    sae = S.train_sae(acts, 128, 8, site, layer, model=name, batch_size=128, epochs=5, progress=False)
    _, sae.mean_activation, sae.frequency = S.measure(sae, acts)
    sae.save(folder / "sae")
    pairs = inverse.collect_pairs(model, texts, site, layer, max_tokens=8)
    config = inverse.GeneratorConfig(model=name, site=site, layer=layer, steps=20, d_model=32, n_layers=1, n_heads=2,
                                     max_tokens=8, held_out=0.0)  # fmt: skip
    generator = inverse.train(pairs, config, progress=False)
    generator.save(folder / "generator" / "generator.pt")
    read = {"model": name, "site": site, "layer": layer, "corpus": "fallback", "texts": len(texts), "max_tokens": 8}
    torch.save({"read": read, "inputs": pairs.inputs, "activations": pairs.activations, "sources": pairs.sources},
               folder / "generator" / "pairs.pt")  # fmt: skip
    return folder / "sae", folder / "generator"
