"""Lenses and linear maps between activations: the baselines and helpers of the Patchscopes recipes.

- ``collect``: activations at chosen positions and layers (one batched read pass per chunk of
  prompts, through ``superscopes.scope.read_vectors``).
- ``fit_affine``: least-squares affine map ``Y ~ X @ W.T + b`` (optionally ridge), usable as
  ``Scope(transforms=["affine"], affine_weight=W, affine_bias=b)``.
- ``decode``: the model's final norm + unembedding applied to any vectors, inside a trace
  (so it also runs on NDIF); ``logit_lens`` and ``affine_lens`` build on it.
- ``final_logprobs``: the model's own next-token log-probabilities at chosen positions.
- ``next_tokens``: the model's own greedy next token at chosen positions (no vocabulary table).
- Cross-model helpers: ``aligned_positions`` (token positions of two tokenizers that end
  at the same character of the same text, at word ends), ``collect_aligned`` and
  ``fit_cross_model`` (one affine map per (source layer, target layer) pair).

Positions are token indices into the tokenised prompt, special tokens (BOS) included,
exactly as ``Scope`` and ``read_vectors`` count them. ``positions`` arguments accept
``"all"`` (every token), ``"text"`` (every token except special tokens and position 0: the
first token is an attention sink whether it is BOS or a word, as in SmolLM2 which adds no
BOS, and its hidden states have outlier norms that would dominate a least-squares fit),
``"last"``, one int per prompt, or one list of ints per prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import nnsight
import torch

import superscopes.readouts.base as readout_base
from superscopes import graph
from superscopes.models import model_name
from superscopes.scope import read_vectors
from superscopes.sites import hidden_size, num_layers

if TYPE_CHECKING:
    from superscopes.models import Model

Positions = str | Sequence[int] | Sequence[Sequence[int]]


# ---------------------------------------------------------------- positions and activations


def _special_mask(tokenizer, ids: list[int]) -> list[bool]:
    special = set(tokenizer.all_special_ids)
    return [i in special for i in ids]


def token_positions(tokenizer, prompts: Sequence[str], positions: Positions = "all") -> list[tuple[int, int]]:
    """``(prompt index, token index)`` pairs, in prompt order then position order."""
    prompts = list(prompts)
    if isinstance(positions, str):
        if positions not in ("all", "text", "last"):
            raise ValueError(f"positions {positions!r}: use 'all', 'text', 'last' or explicit indices")
        pairs = []
        for p, text in enumerate(prompts):
            ids = tokenizer(text)["input_ids"]
            if positions == "all":
                chosen = range(len(ids))
            elif positions == "last":
                chosen = [len(ids) - 1]
            else:
                chosen = [i for i, s in enumerate(_special_mask(tokenizer, ids)) if not s and i > 0]
            pairs += [(p, i) for i in chosen]
        return pairs
    positions = list(positions)
    if len(positions) != len(prompts):
        raise ValueError(f"{len(positions)} position entries for {len(prompts)} prompts")
    pairs = []
    for p, (text, chosen) in enumerate(zip(prompts, positions)):
        n = len(tokenizer(text)["input_ids"])
        for i in [chosen] if isinstance(chosen, int) else chosen:
            if not -n <= i < n:
                raise ValueError(f"position {i} is outside prompt {p} ({n} tokens)")
            pairs.append((p, i % n))
    return pairs


def _layers(model: Model, layers) -> list[int]:
    n = num_layers(model)
    chosen = list(range(n)) if layers == "all" else [layers] if isinstance(layers, int) else list(layers)
    chosen = [layer % n if isinstance(layer, int) and -n <= layer < 0 else layer for layer in chosen]
    for layer in chosen:
        if not isinstance(layer, int) or not 0 <= layer < n:
            raise ValueError(f"layer {layer!r} is out of range 0-{n - 1}")
    return chosen


def collect(
    model: Model,
    prompts: Sequence[str],
    site: str = "resid_post",
    layers: Sequence[int] | int | str = "all",
    positions: Positions = "all",
    batch_size: int = 32,
    remote: bool | str = False,
    progress: bool = False,
) -> dict[int, torch.Tensor]:
    """Activations ``{layer: [n_positions, d]}`` (float32, CPU) at ``site``.

    Rows follow ``token_positions(model.tokenizer, prompts, positions)``; every prompt runs
    once per chunk of ``batch_size`` prompts, all layers read in the same pass. ``progress``:
    a bar that moves per chunk (the same passes, read one chunk at a time)."""
    prompts = list(prompts)
    layers = _layers(model, layers)
    if progress and len(prompts) > batch_size:
        from tqdm.auto import tqdm

        starts = range(0, len(prompts), batch_size)
        per_prompt = isinstance(positions, Sequence) and not isinstance(positions, str)
        parts = [
            collect(
                model,
                prompts[i : i + batch_size],
                site,
                layers,
                positions[i : i + batch_size] if per_prompt else positions,
                batch_size,
                remote,
            )
            for i in tqdm(starts, desc=f"reading {site}", unit="batch")
        ]
        return {layer: torch.cat([part[layer] for part in parts]) for layer in layers}
    pairs = token_positions(model.tokenizer, prompts, positions)
    reads = [(p, i, site, layer) for p, i in pairs for layer in layers]
    if not reads:
        return {layer: torch.empty(0, hidden_size(model)) for layer in layers}
    vectors = read_vectors(model, prompts, reads, batch_size=batch_size, remote=remote)
    vectors = vectors.view(len(pairs), len(layers), -1)
    return {layer: vectors[:, j].contiguous() for j, layer in enumerate(layers)}


# ---------------------------------------------------------------- affine maps


def fit_affine(X: torch.Tensor, Y: torch.Tensor, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares with a bias: ``(W [d_out, d_in], b [d_out])`` minimising
    ``|X @ W.T + b - Y|^2 + ridge * |W|^2`` (the bias is not penalised).

    Solved in float64 with ``torch.linalg.lstsq`` on centred data (ridge as extra rows);
    returned as float32."""
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"X {tuple(X.shape)} and Y {tuple(Y.shape)} must be [n, d_in] and [n, d_out]")
    if X.shape[0] < 2:
        raise ValueError("fit_affine needs at least 2 rows")
    X64, Y64 = X.double(), Y.double()
    x_mean, y_mean = X64.mean(0), Y64.mean(0)
    Xc, Yc = X64 - x_mean, Y64 - y_mean
    if ridge > 0:
        d_in = X.shape[1]
        Xc = torch.cat([Xc, ridge**0.5 * torch.eye(d_in, dtype=torch.float64)])
        Yc = torch.cat([Yc, torch.zeros(d_in, Y.shape[1], dtype=torch.float64)])
    solution = torch.linalg.lstsq(Xc, Yc, driver="gelsd").solution  # [d_in, d_out]
    W = solution.T
    b = y_mean - x_mean @ solution
    return W.float().contiguous(), b.float().contiguous()


def apply_affine(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``X @ W.T + b``: the same map ``ops.amplify(..., transform="affine")`` applies."""
    out = X.to(W.dtype) @ W.T
    return out if b is None else out + b


def r_squared(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of the target's variance (summed over dimensions) the prediction explains."""
    residual = (target - prediction).double().pow(2).sum()
    total = (target - target.mean(0)).double().pow(2).sum()
    return float(1 - residual / total)


# ---------------------------------------------------------------- decoding


def decode(
    model: Model,
    vectors: torch.Tensor,
    top_k: int = 1,
    full: bool = False,
    batch_size: int = 256,
    remote: bool | str = False,
) -> dict[str, torch.Tensor]:
    """The model's final norm and unembedding (and final logit soft-capping, where the
    architecture has it) applied to ``vectors [n, d]`` as if they were the last block's
    output, inside a trace of a one-token prompt (so remote models decode on the server).

    Returns ``ids`` and ``probs`` ``[n, top_k]``, and with ``full=True`` also ``logprobs``
    ``[n, vocab]`` (large: 4 bytes per vocabulary entry per row)."""
    anchor = model.tokenizer.bos_token or "."
    with torch.inference_mode():
        if remote:
            from superscopes import remote as ndif

            with ndif.request(model, remote, ship=(graph, readout_base), name=model_name(model)) as options:
                with model.session(**options):  # one request, however many chunks
                    found = nnsight.save(graph.unembed_vectors(model, vectors, anchor, top_k, full, batch_size))
        else:
            found = graph.unembed_vectors(model, vectors, anchor, top_k, full, batch_size)
    ids, probs, logprobs = found
    out = {"ids": ids, "probs": probs}
    if full:
        out["logprobs"] = logprobs
    return out


@dataclass
class LensOutput:
    """A lens's top-k next-token predictions per layer at each position.

    ``ids``/``probs`` are ``[n_layers, n_positions, top_k]``; ``positions`` are the
    ``(prompt index, token index)`` pairs of the rows; ``maps`` holds fitted affine maps."""

    layers: list[int]
    positions: list[tuple[int, int]]
    ids: torch.Tensor
    probs: torch.Tensor
    maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def top1(self, layer: int) -> torch.Tensor:
        return self.ids[self.layers.index(layer), :, 0]


def logit_lens(
    model: Model,
    prompts: Sequence[str],
    layers: Sequence[int] | int | str = "all",
    positions: Positions = "last",
    top_k: int = 1,
    activations: dict[int, torch.Tensor] | None = None,
    batch_size: int = 32,
    remote: bool | str = False,
) -> LensOutput:
    """Logit lens: final norm + unembedding applied to ``resid_post`` of each layer.

    At the last layer this is the model's own next-token distribution. ``activations``
    (from ``collect`` with the same prompts and positions) skips the read pass."""
    layers = _layers(model, layers)
    pairs = token_positions(model.tokenizer, prompts, positions)
    if activations is None:
        activations = collect(model, prompts, "resid_post", layers, positions, batch_size, remote)
    results = [decode(model, activations[layer], top_k, remote=remote) for layer in layers]
    return LensOutput(
        layers, pairs, torch.stack([r["ids"] for r in results]), torch.stack([r["probs"] for r in results])
    )


def fit_affine_lens(
    model: Model,
    prompts: Sequence[str],
    layers: Sequence[int] | int | str = "all",
    positions: Positions = "text",
    ridge: float = 0.0,
    activations: dict[int, torch.Tensor] | None = None,
    batch_size: int = 32,
    remote: bool | str = False,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Affine ("tuned") lens maps ``{layer: (W, b)}``: least squares from ``resid_post`` of
    each layer to ``resid_post`` of the last layer (before the final norm), on the given
    (held-out) prompts and positions."""
    layers = _layers(model, layers)
    last = num_layers(model) - 1
    if activations is None:
        activations = collect(model, prompts, "resid_post", sorted(set(layers) | {last}), positions, batch_size, remote)
    return {layer: fit_affine(activations[layer], activations[last], ridge) for layer in layers}


def affine_lens(
    model: Model,
    prompts: Sequence[str],
    layers: Sequence[int] | int | str = "all",
    positions: Positions = "last",
    fit_prompts: Sequence[str] | None = None,
    fit_positions: Positions = "text",
    ridge: float = 0.0,
    maps: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    top_k: int = 1,
    activations: dict[int, torch.Tensor] | None = None,
    batch_size: int = 32,
    remote: bool | str = False,
) -> LensOutput:
    """Affine lens: map ``h_l`` to the last layer with a least-squares fit, then decode.

    The maps are fitted on ``fit_prompts`` (held-out text: give prompts that are not the
    evaluated ones) unless ``maps`` are given; the returned ``LensOutput.maps`` holds them."""
    layers = _layers(model, layers)
    if maps is None:
        if fit_prompts is None:
            raise ValueError("affine_lens needs fit_prompts (held-out text) or fitted maps")
        maps = fit_affine_lens(model, fit_prompts, layers, fit_positions, ridge, batch_size=batch_size, remote=remote)
    pairs = token_positions(model.tokenizer, prompts, positions)
    if activations is None:
        activations = collect(model, prompts, "resid_post", layers, positions, batch_size, remote)
    results = [decode(model, apply_affine(activations[layer], *maps[layer]), top_k, remote=remote) for layer in layers]
    ids = torch.stack([r["ids"] for r in results])
    probs = torch.stack([r["probs"] for r in results])
    return LensOutput(layers, pairs, ids, probs, maps={layer: maps[layer] for layer in layers})


def final_logprobs(
    model: Model,
    prompts: Sequence[str],
    positions: Positions = "last",
    batch_size: int = 32,
    remote: bool | str = False,
) -> torch.Tensor:
    """The model's own next-token log-probabilities ``[n_positions, vocab]`` at the positions
    (the logit lens at the last layer, which equals the model's output)."""
    h = _last_block_output(model, prompts, positions, batch_size, remote)
    return decode(model, h, 1, full=True, remote=remote)["logprobs"]


def next_tokens(
    model: Model,
    prompts: Sequence[str],
    positions: Positions = "last",
    batch_size: int = 32,
    remote: bool | str = False,
) -> torch.Tensor:
    """The model's greedy next-token id ``[n_positions]`` at each position (rows as ``collect``'s), without the
    ``[n, vocab]`` table ``final_logprobs`` keeps."""
    h = _last_block_output(model, prompts, positions, batch_size, remote)
    return decode(model, h, 1, remote=remote)["ids"][:, 0]


def _last_block_output(
    model: Model, prompts: Sequence[str], positions: Positions, batch_size: int, remote: bool | str
) -> torch.Tensor:
    """``resid_post`` of the last block at the positions: what the model's own head reads."""
    last = num_layers(model) - 1
    return collect(model, prompts, "resid_post", [last], positions, batch_size, remote)[last]


# ---------------------------------------------------------------- cross-model helpers


def word_ends(text: str) -> list[int]:
    """Character offsets where a word ends (followed by whitespace or the end of the text)."""
    return [m.end() for m in re.finditer(r"\S+", text)]


def token_ends(tokenizer, text: str, skip_first: bool = True) -> dict[int, int]:
    """Character end offset -> index of the last token ending there (special tokens left out,
    and with ``skip_first`` the attention-sink position 0, as in ``"text"`` positions)."""
    encoding = tokenizer(text, return_offsets_mapping=True)
    special = _special_mask(tokenizer, encoding["input_ids"])
    ends = {}
    for i, ((start, end), is_special) in enumerate(zip(encoding["offset_mapping"], special)):
        if end > start and not is_special and (i > 0 or not skip_first):
            ends[end] = i
    return ends


def aligned_positions(
    source_tokenizer, target_tokenizer, prompts: Sequence[str], last_only: bool = False
) -> tuple[list[list[int]], list[list[int]]]:
    """Per prompt, token positions in each tokenizer that end at the same word end.

    Both models have then read exactly the same text up to and including that token (its
    word-level prefix). ``last_only``: only the prompt's last word (when both tokenizers
    end a token there). Returns ``(source positions, target positions)``, one list per prompt."""
    source_positions, target_positions = [], []
    for text in prompts:
        a, b = token_ends(source_tokenizer, text), token_ends(target_tokenizer, text)
        ends = [e for e in word_ends(text) if e in a and e in b]
        if last_only:
            ends = ends[-1:] if ends and ends[-1] == len(text.rstrip()) else []
        source_positions.append([a[e] for e in ends])
        target_positions.append([b[e] for e in ends])
    return source_positions, target_positions


def collect_aligned(
    source_model,
    target_model: Model,
    prompts: Sequence[str],
    source_layers: Sequence[int] | int | str,
    target_layers: Sequence[int] | int | str,
    site: str = "resid_post",
    batch_size: int = 32,
    remote: bool | str = False,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Paired activations of two models at aligned positions (same text, same word end):
    ``({source layer: [n, d_source]}, {target layer: [n, d_target]})`` with matching rows."""
    prompts = list(prompts)
    src_pos, tgt_pos = aligned_positions(source_model.tokenizer, target_model.tokenizer, prompts)
    X = collect(source_model, prompts, site, source_layers, src_pos, batch_size, remote)
    Y = collect(target_model, prompts, site, target_layers, tgt_pos, batch_size, remote)
    return X, Y


def fit_cross_model(
    source_model,
    target_model: Model,
    prompts: Sequence[str],
    source_layers: Sequence[int] | int | str,
    target_layers: Sequence[int] | int | str,
    site: str = "resid_post",
    ridge: float = 0.0,
    batch_size: int = 32,
    remote: bool | str = False,
) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """One least-squares affine map per (source layer, target layer) pair, from the source
    model's ``site`` to the target model's ``site`` at aligned positions of ``prompts``.

    Use a map as ``Scope(transforms=["affine"], affine_weight=W, affine_bias=b)`` with
    ``superscopes.run(source_model, scope, target_model=target_model)``."""
    X, Y = collect_aligned(source_model, target_model, prompts, source_layers, target_layers, site, batch_size, remote)
    return {(ls, lt): fit_affine(X[ls], Y[lt], ridge) for ls in X for lt in Y}
