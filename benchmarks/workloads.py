"""The workloads every comparison shares: prompts, grids, the tiny model, long prompts."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

import superscopes
from superscopes.prompts import ENTITY_DESCRIPTION

SOURCE = "Diana, Princess of Wales"  # a Superscopes paper example (MLP output, layers 1-4)
TOKEN = "Wales"
TARGET = ENTITY_DESCRIPTION  # the entity-description target, patched on its last token "x"
SHORT_TARGET = "Syria: Country in the Middle East, x"  # 10 tokens: the cell-count curve
GRID_SITES = ["mlp_in", "mlp_out", "resid_post"]
GRID_LAYERS = [1, 2, 3, 4, 5, 6, 7]
GRID_ALPHAS = [1, 3, 6, 9, 12, 15]
CELL_SITES = ["resid_pre", "attn_out", "mlp_out", "resid_post"]
CELL_ALPHAS = [1, 2, 3, 4, 6, 9, 12, 15]


@dataclass(frozen=True)
class Sizes:
    """Everything ``--quick`` shrinks."""

    rounds_small: int  # rounds of the cheap blocks (B=1 forward, tiny model)
    rounds_tiny: int
    batch: int  # the "B=64" of the forward-overhead target
    rounds_batch: int
    grid_layers: list[int]
    grid_alphas: list[float]
    max_new_tokens: int
    cells: list[int]  # the cell-count curve
    baseline_cells_per_round: int  # per-cell baseline: above this many cells, sample and extrapolate
    lengths: list[int]  # the prompt-length curve (tokens)
    length_alphas: list[float]
    rounds_curve: int
    memory_cells: list[int]
    memory_lengths: list[int]
    memory_batch_sizes: list[int]  # extra batch sizes, at 64 cells


FULL = Sizes(
    rounds_small=7,
    rounds_tiny=30,
    batch=64,
    rounds_batch=3,
    grid_layers=GRID_LAYERS,
    grid_alphas=GRID_ALPHAS,
    max_new_tokens=10,
    cells=[1, 8, 64, 512],
    baseline_cells_per_round=64,
    lengths=[8, 32, 128, 512],
    length_alphas=[1, 6],
    rounds_curve=2,
    memory_cells=[1, 8, 64, 128, 256, 512],
    memory_lengths=[8, 32, 128, 512],
    memory_batch_sizes=[16],
)

QUICK = Sizes(
    rounds_small=2,
    rounds_tiny=5,
    batch=4,
    rounds_batch=2,
    grid_layers=[3],
    grid_alphas=[1, 6],
    max_new_tokens=2,
    cells=[1, 8],
    baseline_cells_per_round=4,
    lengths=[8, 24],
    length_alphas=[1, 6],
    rounds_curve=2,
    memory_cells=[1, 8],
    memory_lengths=[],
    memory_batch_sizes=[],
)


def grid_scope(sizes: Sizes, output: str = "generate") -> superscopes.Scope:
    """The headline grid: 1 token x 3 sites x 7 layers x 6 alphas (126 cells), l* = l, 10 tokens."""
    return superscopes.Scope(
        SOURCE,
        token=TOKEN,
        sites=GRID_SITES,
        layers=sizes.grid_layers,
        alphas=sizes.grid_alphas,
        target_layers=["same"],
        output=output,
        max_new_tokens=sizes.max_new_tokens,
    )


def cells_scope(n: int, batch_size: int = 64) -> superscopes.Scope:
    """``n`` cells (n = sites x layers x alphas) on the short target, next-token top-k."""
    shapes = {
        1: (1, 1, 1),
        4: (1, 2, 2),
        8: (1, 2, 4),
        16: (2, 4, 2),
        64: (2, 8, 4),
        128: (2, 8, 8),
        256: (4, 8, 8),
        512: (4, 16, 8),
    }
    n_sites, n_layers, n_alphas = shapes[n]
    sites = CELL_SITES[-n_sites:]
    return superscopes.Scope(
        SOURCE,
        token=TOKEN,
        sites=sites,
        layers=list(range(n_layers)),
        alphas=CELL_ALPHAS[:n_alphas],
        target=SHORT_TARGET,
        placeholder="x",
        target_layers=["same"],
        output="topk",
        batch_size=batch_size,
    )


def length_scope(text: str, alphas: list[float]) -> superscopes.Scope:
    """Back-patching into the source prompt itself at its last token: both passes scale with length."""
    return superscopes.Scope(
        text,
        position=-1,
        sites=["resid_post"],
        layers=[3],
        alphas=alphas,
        target="source",
        target_layers=["same"],
        output="topk",
        batch_size=64,
    )


_PARAGRAPH = (
    "The old lighthouse stood at the edge of the harbour for more than two hundred years. Fishermen "
    "returning late in the evening watched for its beam, and children from the village climbed the "
    "spiral stairs on summer afternoons to look out over the grey water. When the keeper retired, the "
    "town council argued for months about whether to sell the building, turn it into a museum, or let "
    "the sea take it back. In the end a small group of volunteers repaired the roof, painted the walls "
    "white again and opened a cafe on the ground floor, where visitors now drink tea and read about "
    "the storms, shipwrecks and rescues that shaped the coast. "
)


def text_of_length(tokenizer, n_tokens: int) -> str:
    """A deterministic English prose prompt of about ``n_tokens`` tokens (the count is recorded)."""
    text = _PARAGRAPH * (n_tokens // 60 + 2)
    ids = tokenizer(text)["input_ids"][:n_tokens]
    return tokenizer.decode(ids).strip()


def tiny_model(tokenizer, seed: int = 0):
    """A random 2-layer Llama (d=64, vocab 49152) wrapped by nnsight, with SmolLM2's tokenizer."""
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config).eval()
    return TransformersModel(hf, tokenizer=tokenizer)


def with_output(scope: superscopes.Scope, output: str) -> superscopes.Scope:
    return replace(scope, output=output)
