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
