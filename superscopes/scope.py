"""The amplify-and-patch graph: read -> transform -> write -> continue, as batched nnsight traces.

A ``Scope`` describes a grid: source prompts x token positions x sites x (layer, target
layer) pairs x transforms x alphas (x sampled tries). ``run`` executes it in two stages:

1. *Read*: every source prompt runs once (batched), and every vector any cell needs is
   read in that pass, which stops after its last read layer (optionally with each vector's
   logit lens).
2. *Patch*: cells become rows of batched target passes (one ``generate`` or ``trace`` per
   chunk of ``batch_size`` rows). The rows of a pass share one target text, whose tokens
   before the patched position run once per run (the shared prefix); every row continues
   from that prefix's KV cache (for ``generate``, with the room its new tokens need allocated
   once). Inside a pass, each (target layer, target site) group of rows gets its
   transformed vectors written in forward order.

Because the vectors are read in a separate pass, the target layer may be below the source
layer (back-patching) and the target may be another model (cross-model patching).
Every cell is validated before any forward pass.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import numbers
import operator
import sys
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal

import nnsight
import torch

from superscopes import graph, ops, readouts
from superscopes.graph import (
    Settings,
    _execute,
    _execute_reads,
    _Group,
    _Pass,
    _Work,
    refuse_overflow,
)
from superscopes.models import model_name
from superscopes.parsing import DEFAULT_BATCH_SIZE, DEFAULT_THREADS
from superscopes.prompts import TEMPLATES, TokenNotFoundError, find_token, num_tokens, tokens
from superscopes.sites import SITE_NAMES, ScopeError, architecture_of, hidden_size, num_layers

if TYPE_CHECKING:  # pandas is imported where a frame is built: it adds ~0.3 s to `import superscopes`
    import pandas as pd

TargetLayer = int | Literal["same"]

RESULT_COLUMNS = [
    "model", "source", "token", "position", "site", "layer", "target", "target_layer", "target_site",
    "target_position", "transform", "alpha", "mode", "sample", "output", "output_ids",
]  # fmt: skip


@dataclass
class Scope:
    """A Superscopes / Patchscopes grid. Defaults follow the Superscopes paper.

    Source positions: ``token`` (substring, first match, last token of it), ``position``
    (index into the tokenised prompt, BOS included, negative from the end), ``all_tokens``,
    else the last token. ``token`` and ``position`` may also be lists, one per prompt.
    ``target``: a template name (``entity``, ``identity``), template text containing
    ``placeholder``, or ``"source"`` to write back into the source prompt at the source
    position (back-patching); or a list of these, one per prompt (e.g. each query its own
    target). ``target_position``: ``placeholder``, ``last`` or an index.
    Layers: every source layer in ``layers`` with every ``target_layers`` entry (``"same"``:
    the source layer), or the explicit ``(layer, target_layer)`` pairs of ``layer_pairs``.
    ``where`` keeps only the cells it returns True for (a ``Cell``).
    ``transforms``: see ``ops.amplify``, plus ``none`` (nothing is written: the target's own
    output, the control a readout is compared with). ``affine_weight``/``affine_bias``: one
    map, or a dict of maps keyed by ``(layer, target_layer)`` (one per layer pair).
    ``sae_latent``: ``(sae, latent)`` for the ``latent`` transform (amplify that SAE latent's
    component of each read vector; the cells must read at the SAE's site and layer).
    ``output``: ``generate`` (``max_new_tokens`` tokens) or ``topk`` (next-token top-k): a
    primary readout of ``superscopes.readouts.REGISTRY``. ``readouts``: further readouts by
    name (``superscopes.readouts.available()`` lists them with their columns), e.g. ``lens``.
    Greedy by default; ``do_sample=True`` samples at ``temperature`` (no top-k/top-p
    truncation) with one seed per cell derived from ``seed`` and the cell itself, so a
    sampled cell's text does not depend on ``batch_size`` or on the rest of the grid.
    ``share_prefix``: run the target prompt's tokens before the patched position once per
    run and reuse their KV cache in every row (same results, much less compute); ``False``
    runs every row's whole prompt, as plain batching does.
    ``logit_lens``: also read each source vector through the model's final norm and
    unembedding in the read pass (columns ``lens``, ``lens_ids``, ``lens_probs``: top-k); the
    same as the ``lens`` readout.
    ``vectors``: ``[len(prompts), d]`` external source vectors (e.g. SAE latents' decoder
    directions) instead of read ones: nothing is read, ``prompts`` only name the vectors,
    and the one ``sites``/``layers`` entry says where they belong (for ``"same"``).
    ``intervene``: your own function ``intervene(model)``, called inside every forward pass
    the grid runs (reads, shared prefixes, patched passes at every generated token) before
    the grid's own reads and writes at the same module, so an ablation in it makes the grid
    that of the ablated model. What it returns in a patched pass's first forward, ``None`` or
    a dict of tensors with one row per batch row, is joined to the frame per cell (one column
    per key). It must be trace code (module accesses in forward order, plain torch) to run
    remotely. The model it gets is the one being traced (``target_model`` in patched passes).
    """

    prompts: Sequence[str] | str
    token: str | Sequence[str] | None = None
    position: int | Sequence[int] | None = None
    all_tokens: bool = False
    sites: Sequence[str] = ("mlp_out", "resid_post")
    layers: Sequence[int] | Literal["all"] = "all"
    alphas: Sequence[float] = (1, 3, 6, 9, 12, 15)
    transforms: Sequence[str] = ("scale",)
    target: str | Sequence[str] = "entity"
    placeholder: str | None = None
    target_position: Literal["placeholder", "last"] | int = "placeholder"
    target_layers: Sequence[TargetLayer] = (0,)
    layer_pairs: Sequence[tuple[int, int]] | None = None
    target_site: str = "resid_post"
    mode: Literal["replace", "add"] = "replace"
    output: Literal["generate", "topk"] = "generate"
    max_new_tokens: int = 10
    top_k: int = 10
    do_sample: bool = False
    temperature: float = 1.0
    samples: int = 1
    seed: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    share_prefix: bool = True
    logit_lens: bool = False
    vectors: torch.Tensor | None = field(default=None, repr=False)
    max_cells: int = 20_000
    affine_weight: torch.Tensor | dict[tuple[int, int], torch.Tensor] | None = field(default=None, repr=False)
    affine_bias: torch.Tensor | dict[tuple[int, int], torch.Tensor] | None = field(default=None, repr=False)
    where: Callable[[Cell], bool] | None = field(default=None, repr=False)
    sae_latent: tuple | None = field(default=None, repr=False)
    intervene: Callable[[object], dict[str, torch.Tensor] | None] | None = field(default=None, repr=False)
    readouts: Sequence[str] = ()

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        if not isinstance(self.prompts, Iterable):
            raise ScopeError(f"prompts {self.prompts!r} must be a prompt (text) or a list of prompts")
        self.prompts = list(self.prompts)
        for name in ("sites", "alphas", "transforms", "target_layers", "readouts"):
            value = getattr(self, name)
            setattr(self, name, [value] if isinstance(value, (str, int, float)) else list(value))
        if not (isinstance(self.layers, str) and self.layers == "all"):
            self.layers = _integers(self.layers)
        self.target_layers = [t if t == "same" else _integer(t) for t in self.target_layers]
        # numpy / torch scalars as Python numbers (np.arange alphas); text and None stay, for validation
        self.alphas = [float(a) if isinstance(a, numbers.Real) and not isinstance(a, bool) else a for a in self.alphas]
        if self.layer_pairs is not None:
            self.layer_pairs = [tuple(_integer(x) for x in pair) if isinstance(pair, (list, tuple)) else pair
                                for pair in self.layer_pairs]  # fmt: skip


def _integer(value):
    """``np.int64(3)``, a 0-d tensor -> 3; anything else unchanged, for validation to name."""
    if isinstance(value, (bool, str)):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def _integers(values) -> list:
    """A layer, or a sequence of them (a list, range, numpy array, tensor), as Python ints."""
    if isinstance(values, str) or not hasattr(values, "__iter__") or _integer(values) is not values:
        return [_integer(values)]  # one layer (np.int64, a 0-d tensor) or a value for validation to name
    return [_integer(v) for v in values]


@dataclass(frozen=True)
class Source:
    """A source vector's place: prompt (index into ``Scope.prompts``), token index, token text."""

    prompt: int
    position: int
    token: str


@dataclass(frozen=True)
class Cell:
    """One readout: read ``site`` at ``layer`` of ``source``, transform, write at ``target_layer``."""

    source: Source
    site: str
    layer: int
    transform: str
    alpha: float
    target_layer: int
    sample: int


@dataclass(frozen=True)
class Target:
    """Where a prompt's cells write: ``text`` at token ``index``; ``None`` for back-patching
    (the source prompt itself, at the source position)."""

    text: str | None
    index: int | None


@dataclass
class Plan:
    """A validated grid: its cells, and each prompt's target. Made by ``plan``; no forward pass."""

    scope: Scope
    sources: list[Source]
    cells: list[Cell]
    targets: list[Target]  # one per prompt

    def target_of(self, cell: Cell) -> tuple[str, int]:
        """The text and token index the cell's vector is written at."""
        target = self.targets[cell.source.prompt]
        if target.text is None:
            return self.scope.prompts[cell.source.prompt], cell.source.position
        return target.text, target.index


# ---------------------------------------------------------------- validation


def _choices(name: str, value, valid: Sequence) -> None:
    if value not in valid:
        raise ScopeError(f"{name} {value!r} is not valid; choose from {', '.join(map(str, valid))}")


def _check_layers(name: str, layers: Sequence, model) -> None:
    n = num_layers(model)
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
            raise ScopeError(f"{name} {layer!r} is out of range: {model_name(model)} has layers 0-{n - 1}")


def _per_prompt(name: str, value, n_prompts: int) -> list:
    """A setting given once for all prompts, or as a list of one value per prompt."""
    if isinstance(value, (list, tuple)):
        if len(value) != n_prompts:
            raise ScopeError(
                f"{name} has {len(value)} entries for {n_prompts} prompts: give one per prompt, or one for all"
            )
        return list(value)
    return [value] * n_prompts


def _sources(scope: Scope, tokenizer) -> list[Source]:
    chosen = sum([scope.token is not None, scope.position is not None, scope.all_tokens])
    if scope.vectors is not None:  # named external vectors: no token to choose
        if chosen:
            raise ScopeError("token, position and all_tokens choose read vectors; with vectors, leave them unset")
        return [Source(index, 0, name) for index, name in enumerate(scope.prompts)]
    if chosen > 1:
        raise ScopeError("give at most one of token, position and all_tokens")
    n = len(scope.prompts)
    tokens_wanted, positions_wanted = _per_prompt("token", scope.token, n), _per_prompt("position", scope.position, n)
    sources = []
    for index, (prompt, token, position) in enumerate(zip(scope.prompts, tokens_wanted, positions_wanted)):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ScopeError(f"prompt {index} is empty: {prompt!r}")
        pieces = tokens(tokenizer, prompt)
        if scope.all_tokens:
            positions = list(range(len(pieces)))
        elif token is not None:
            try:
                positions = [find_token(tokenizer, prompt, token)]
            except TokenNotFoundError as error:
                raise ScopeError(str(error)) from None
        elif position is not None:
            if not -len(pieces) <= position < len(pieces):
                raise ScopeError(f"position {position} is outside prompt {prompt!r} ({len(pieces)} tokens: {pieces})")
            positions = [position % len(pieces)]
        else:
            positions = [len(pieces) - 1]
        sources += [Source(index, p, pieces[p]) for p in positions]
    return sources


def _target(scope: Scope, target: str, tokenizer) -> Target:
    if target == "source":
        if scope.target_position != "placeholder":
            raise ScopeError('target "source" writes at the source position; leave target_position as "placeholder"')
        return Target(None, None)
    template = TEMPLATES.get(target)
    text = template.text if template else target
    placeholder = scope.placeholder or (template.placeholder if template else "x")
    if not isinstance(text, str) or not text.strip():
        raise ScopeError(f"the target prompt is empty: {target!r}")
    n = num_tokens(tokenizer, text)
    if scope.target_position == "placeholder":
        try:
            return Target(text, find_token(tokenizer, text, placeholder, last_occurrence=True))
        except TokenNotFoundError:
            raise ScopeError(
                f"target {text!r} has no placeholder {placeholder!r}: put it where the vector goes, "
                "or set target_position to 'last' or an index"
            ) from None
    if scope.target_position == "last":
        return Target(text, n - 1)
    if isinstance(scope.target_position, int) and -n <= scope.target_position < n:
        return Target(text, scope.target_position % n)
    raise ScopeError(
        f"target_position {scope.target_position!r} is not 'placeholder', 'last' or an index in 0-{n - 1}"
    )


def _layer_pairs(scope: Scope, model, target_model) -> list[tuple[int, int]]:
    """(source layer, target layer) pairs, validated against both models."""
    if scope.layer_pairs is not None:
        if not scope.layer_pairs or any(not isinstance(pair, tuple) or len(pair) != 2 for pair in scope.layer_pairs):
            raise ScopeError(f"layer_pairs must be (layer, target_layer) pairs, got {scope.layer_pairs!r}")
        _check_layers("layer", [l for l, _ in scope.layer_pairs], model)
        _check_layers("target_layer", [t for _, t in scope.layer_pairs], target_model)
        return list(dict.fromkeys(scope.layer_pairs))
    layers = list(range(num_layers(model))) if scope.layers == "all" else scope.layers
    if not layers:
        raise ScopeError("no layers given")
    _check_layers("layer", layers, model)
    _check_layers("target_layer", [t for t in scope.target_layers if t != "same"], target_model)
    if "same" in scope.target_layers and num_layers(target_model) < max(layers) + 1:
        raise ScopeError(f"target_layer 'same' needs layer {max(layers)} in {model_name(target_model)}")
    return [(layer, layer if t == "same" else t) for layer in layers for t in scope.target_layers]


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy integers too


def _check_types(scope: Scope) -> None:
    """Settings of the wrong type, named before they fail deep inside tokenisation or batching."""
    for index, prompt in enumerate(scope.prompts):
        if not isinstance(prompt, str):
            raise ScopeError(f"prompt {index} is {prompt!r} ({type(prompt).__name__}); prompts are text")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as error:  # a lone surrogate: no tokenizer can encode it
            raise ScopeError(f"prompt {index} {prompt!r} has a character that is not valid text "
                             f"({prompt[error.start]!r} at {error.start}, a lone surrogate)") from None  # fmt: skip
    for name, kind, ok in (("token", "text", lambda v: isinstance(v, str)), ("position", "a whole number", _whole)):
        value = getattr(scope, name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and not ok(item):
                raise ScopeError(f"{name} {item!r} must be {kind}, one for all prompts or a list of one per prompt")
    if not _whole(scope.batch_size) or scope.batch_size < 1:
        raise ScopeError(f"batch_size {scope.batch_size!r} must be a whole number, at least 1")
    if not _whole(scope.samples) or scope.samples < 1:
        raise ScopeError(f"samples {scope.samples!r} must be a whole number, at least 1")
    if scope.seed is not None and not _whole(scope.seed):
        raise ScopeError(f"seed {scope.seed!r} must be a whole number, or None")
    for alpha in scope.alphas:
        if isinstance(alpha, torch.Tensor):
            raise ScopeError(f"alpha {alpha!r} is a tensor; give plain numbers (alphas=tensor.tolist())")


def _check_not_empty(scope: Scope) -> None:
    for name in ("sites", "alphas", "transforms", "target_layers"):
        if not getattr(scope, name):
            raise ScopeError(f"no {name} given: an empty {name} list would make an empty grid")


def _check_numbers(scope: Scope, target_model) -> None:
    """Generation settings, named with their valid range."""

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if scope.do_sample and not (isinstance(scope.temperature, (int, float)) and math.isfinite(scope.temperature)
                                and scope.temperature > 0):  # fmt: skip
        raise ScopeError(f"temperature {scope.temperature!r} must be a finite number above 0")
    if scope.output == "generate" and not (is_int(scope.max_new_tokens) and scope.max_new_tokens >= 1):
        raise ScopeError(f"max_new_tokens {scope.max_new_tokens!r} must be a whole number, at least 1")
    limit = torch.finfo(getattr(target_model, "dtype", torch.float32)).max
    for alpha in scope.alphas:
        if isinstance(alpha, (int, float)) and abs(alpha) >= limit:
            raise ScopeError(f"alpha {alpha!r} overflows the model's dtype (largest value {limit:.3g})")


def _check_affine(scope: Scope, model, target_model, pairs: list[tuple[int, int]]) -> None:
    """A map for every layer pair (one map, or a dict of maps by pair); each map's shape is
    [target hidden, source hidden] (bias [target hidden]), all finite."""
    if "affine" not in scope.transforms:
        return
    if scope.affine_weight is None:
        raise ScopeError("transform 'affine' needs affine_weight (and optionally affine_bias)")
    if isinstance(scope.affine_weight, dict):
        missing = [pair for pair in pairs if pair not in scope.affine_weight]
        if missing:
            raise ScopeError(
                f"affine_weight has no map for layer pair(s) {missing[:5]}: give one per (layer, target_layer)"
            )
    d_source, d_target = hidden_size(model), hidden_size(target_model)
    shapes = {"affine_weight": (d_target, d_source), "affine_bias": (d_target,)}
    for name, shape in shapes.items():
        value = getattr(scope, name)
        for key, tensor in (value.items() if isinstance(value, dict) else [(None, value)]):
            label = name if key is None else f"{name}[{key}]"
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ScopeError(f"{label} must be a tensor of shape {list(shape)}, got {got}")
            if not torch.isfinite(tensor).all():
                raise ScopeError(f"{label} has non-finite values (nan or inf)")


def _check_context(scope: Scope, model, target_model, targets: list[Target]) -> None:
    """Every prompt, plus the generated tokens where they follow it, fits the model's context."""
    new = scope.max_new_tokens if scope.output == "generate" else 0
    checks = [(model, prompt, 0) for prompt in scope.prompts]
    texts = {t.text if t.text is not None else prompt for t, prompt in zip(targets, scope.prompts)}
    checks += [(target_model, text, new) for text in sorted(texts)]
    for m, text, extra in checks:
        limit = getattr(m.config, "max_position_embeddings", None)
        if limit is not None and num_tokens(m.tokenizer, text) + extra > limit:
            raise ScopeError(
                f"prompt {text[:60]!r}{'...' if len(text) > 60 else ''} has {num_tokens(m.tokenizer, text)} tokens "
                f"(+{extra} generated): over "
                f"{model_name(m)}'s context of {limit} tokens"
            )


def _check_vectors(scope: Scope, pairs: list[tuple[int, int]], targets: list[str], model) -> None:
    shape, wanted = tuple(getattr(scope.vectors, "shape", ())), (len(scope.prompts), hidden_size(model))
    if shape != wanted:
        raise ScopeError(f"vectors has shape {shape}; give one {wanted[1]}-vector per prompt (name): {wanted}")
    if len(scope.sites) != 1 or len({layer for layer, _ in pairs}) != 1:
        raise ScopeError("vectors belong to one site and layer: give exactly one site and one source layer")
    if "source" in targets or scope.logit_lens:
        raise ScopeError('target "source" and logit_lens need read vectors; with vectors, use a target template')


def _check_latent(scope: Scope, model, pairs: list[tuple[int, int]]) -> None:
    """The ``latent`` transform's SAE fits the model, the latent exists, and every source
    vector is read where the SAE was trained (its site and layer)."""
    if "latent" not in scope.transforms:
        return
    if not (isinstance(scope.sae_latent, tuple) and len(scope.sae_latent) == 2):
        raise ScopeError("transform 'latent' needs sae_latent=(sae, latent index), e.g. (superscopes.sae.load(...), 345)")
    sae, latent = scope.sae_latent
    sae.check(model)
    sae._latents([latent])
    wrong = sorted({(site, layer) for site in scope.sites for layer, _ in pairs} - {(sae.site, sae.layer)})
    if wrong:
        raise ScopeError(f"transform 'latent' amplifies a latent of an SAE on {sae.site} layer {sae.layer}; the grid "
                         f"reads {wrong[:5]} too: use sites=[{sae.site!r}], layers=[{sae.layer}]")  # fmt: skip


def plan(model, scope: Scope, target_model=None) -> Plan:
    """Validate ``scope`` against the model(s) and expand it into cells. No forward pass."""
    target_model = target_model or model
    if not scope.prompts:
        raise ScopeError("no prompts given")
    _check_types(scope)
    _check_not_empty(scope)
    source_arch, target_arch = architecture_of(model), architecture_of(target_model)
    for site in scope.sites:
        _choices("site", site, list(source_arch.sites))
    _choices("target_site", scope.target_site, list(target_arch.sites))
    for transform in scope.transforms:
        _choices("transform", transform, list(ops.TRANSFORM_TABLE))
    _choices("mode", scope.mode, ops.WRITE_MODES)
    _choices("output", scope.output, [r.name for r in readouts.REGISTRY.values() if r.primary])
    for name in scope.readouts:
        _choices("readout", name, [r.name for r in readouts.REGISTRY.values() if not r.primary])
    pairs = _layer_pairs(scope, model, target_model)
    for alpha in scope.alphas:
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ScopeError(f"alpha {alpha!r} is not a finite number")
    _check_affine(scope, model, target_model, pairs)
    _check_latent(scope, model, pairs)
    targets_wanted = _per_prompt("target", scope.target, len(scope.prompts))
    if scope.vectors is not None:
        _check_vectors(scope, pairs, targets_wanted, model)
    if target_model is not model and "source" in targets_wanted:
        raise ScopeError('target "source" means the source prompt in the source model; give a target template')
    mapped = {name for name, spec in ops.TRANSFORM_TABLE.items() if spec.any_hidden_size}
    if hidden_size(model) != hidden_size(target_model) and not set(scope.transforms) <= mapped:
        raise ScopeError(
            f"hidden sizes differ ({hidden_size(model)} vs {hidden_size(target_model)}): "
            "only transform 'affine' can map between these models"
        )
    for readout in _readouts(scope):
        readout.check(scope, model, target_model)
    _check_numbers(scope, target_model)
    if scope.samples > 1 and not scope.do_sample:
        raise ScopeError(f"samples={scope.samples}: more than one try per cell needs do_sample=True")

    sources = _sources(scope, model.tokenizer)
    resolved = {t: _target(scope, t, target_model.tokenizer) for t in dict.fromkeys(targets_wanted)}
    _check_context(scope, model, target_model, [resolved[t] for t in targets_wanted])
    n_cells = len(sources) * len(scope.sites) * len(pairs) * len(scope.transforms) * len(scope.alphas) * scope.samples
    if n_cells > scope.max_cells:
        raise ScopeError(
            f"the grid has {n_cells} cells ({len(sources)} source tokens x {len(scope.sites)} sites x "
            f"{len(pairs)} layer pairs x {len(scope.transforms)} transforms x {len(scope.alphas)} alphas x "
            f"{scope.samples} samples), over max_cells={scope.max_cells}"
        )
    # Built only after the count is checked: product() materialises its inputs (range(samples) too).
    grid = itertools.product(sources, scope.sites, pairs, scope.transforms, scope.alphas, range(scope.samples))
    cells = [Cell(src, site, layer, transform, float(alpha), target_layer, sample)
             for src, site, (layer, target_layer), transform, alpha, sample in grid]  # fmt: skip
    if scope.where is not None:
        cells = [cell for cell in cells if scope.where(cell)]
        if not cells:
            raise ScopeError("`where` kept none of the grid's cells")
    return Plan(scope, sources, cells, [resolved[t] for t in targets_wanted])


def _readouts(scope: Scope) -> list[readouts.Readout]:
    """The scope's readouts, the primary one (``output``) first; ``logit_lens`` is ``lens``."""
    names = [scope.output, *(["lens"] if scope.logit_lens else []), *scope.readouts]
    return [readouts.REGISTRY[name] for name in dict.fromkeys(names)]


def _shipped(scope: Scope) -> tuple[ModuleType, ...]:
    """What a remote request sends by value besides ``ops`` and ``sites``: the graph's passes,
    the readouts package, and the module of any readout registered from elsewhere."""
    own = {graph.__name__, readouts.__name__}
    others = {type(r).__module__ for r in _readouts(scope)} - {"__main__"}
    others = {m for m in others if m not in own and not m.startswith(readouts.__name__ + ".")}
    return (graph, readouts, *(sys.modules[m] for m in sorted(others)))


# ---------------------------------------------------------------- execution


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _lengths(tokenizer, texts: list[str]) -> list[int]:
    """Token counts of ``texts``, each distinct text tokenised once."""
    counts = {text: num_tokens(tokenizer, text) for text in set(texts)}
    return [counts[text] for text in texts]


def _columns(lengths: list[int], rows: list[int], positions: list[int]) -> torch.Tensor:
    """Token index in row ``r`` -> column in the left-padded batch of rows with ``lengths``."""
    width = max(lengths)
    return torch.tensor([width - lengths[r] + p for r, p in zip(rows, positions)])


def _forward_groups(keys: list[tuple[str, int]]) -> list[list[int]]:
    """Indices grouped by (site, layer), groups in the order a forward pass reaches them."""
    order = sorted(range(len(keys)), key=lambda i: (keys[i][1], SITE_NAMES.index(keys[i][0])))
    return [list(g) for _, g in itertools.groupby(order, key=lambda i: keys[i])]


def _read_passes(tokenizer, prompts: list[str], reads: list[tuple[int, int, str, int]], batch_size: int) -> list[_Pass]:
    passes = []
    for start in range(0, len(prompts), batch_size):
        texts = prompts[start : start + batch_size]
        ids = [i for i, r in enumerate(reads) if start <= r[0] < start + batch_size]
        if not ids:
            continue
        groups, lengths = [], _lengths(tokenizer, texts)
        for group in _forward_groups([(reads[i][2], reads[i][3]) for i in ids]):
            members = [ids[j] for j in group]
            rows = [reads[i][0] - start for i in members]
            columns = _columns(lengths, rows, [reads[i][1] for i in members])
            groups.append(_Group(reads[members[0]][2], reads[members[0]][3], torch.tensor(rows), columns,
                                 torch.tensor(members)))  # fmt: skip
        passes.append(_Pass(groups, texts=texts))
    return passes


def cell_seed(seed: int, cell: Cell) -> int:
    """A sampled cell's own seed: a stable hash of what the cell is, so its text does not
    depend on the batch size, the chunking or the other cells of the grid."""
    src = cell.source
    key = f"{seed}|{src.prompt}|{src.position}|{cell.site}|{cell.layer}|{cell.transform}|{cell.alpha!r}|"
    return zlib.crc32(f"{key}{cell.target_layer}|{cell.sample}".encode())


def _patch_passes(target_model, the_plan: Plan, vector_of: dict,
                  map_of: dict | None) -> tuple[list[_Pass], list[int], list[torch.Tensor]]:  # fmt: skip
    """Batched target passes, the cell order they cover, and the shared prefixes' token ids.

    Rows of a pass share one transform; with ``share_prefix`` they also share one target
    text, whose tokens before the first patched position run once for all of them.
    ``map_of``: (layer, target layer) -> index of its affine map, when maps are per pair."""
    scope, cells, tokenizer = the_plan.scope, the_plan.cells, target_model.tokenizer

    rows_of_text = collections.Counter(the_plan.target_of(cell)[0] for cell in cells)

    def pass_key(i: int) -> tuple:
        """Transform, and the shared text: rows of a text that has several share its prefix;
        texts with one row gain nothing from it and batch together, padded, as plain passes."""
        text = the_plan.target_of(cells[i])[0]
        shared = scope.share_prefix and rows_of_text[text] > 1
        return scope.transforms.index(cells[i].transform), text if shared else ""

    token_ids: dict[str, torch.Tensor] = {}
    prefix_index: dict[tuple[str, int], int] = {}
    prefixes: list[torch.Tensor] = []

    def shared_inputs(text: str, positions: list[int]) -> tuple[torch.Tensor, dict]:
        """Columns and inputs of a pass whose rows all continue one text's shared prefix."""
        if text not in token_ids:
            token_ids[text] = torch.tensor([tokenizer(text)["input_ids"]])
        start = min(positions)  # every row's tokens before its first patched one are the same
        prefix = None
        if start > 0:
            if (text, start) not in prefix_index:
                prefix_index[(text, start)] = len(prefixes)
                prefixes.append(token_ids[text][:, :start])
            prefix = prefix_index[(text, start)]
        return torch.tensor(positions) - start, {"ids": token_ids[text], "start": start, "prefix": prefix}

    passes, covered = [], []
    order = sorted(range(len(cells)), key=pass_key)
    for key, same in itertools.groupby(order, key=pass_key):
        for chunk in _chunks(list(same), scope.batch_size):
            chunk_cells = [cells[i] for i in chunk]
            texts, positions = map(list, zip(*(the_plan.target_of(c) for c in chunk_cells)))
            if key[1]:
                columns, inputs = shared_inputs(texts[0], positions)
            else:
                lengths = _lengths(tokenizer, texts)
                columns = _columns(lengths, list(range(len(chunk))), positions)
                inputs = {"texts": texts, "width": max(lengths)}
            vector_ids = torch.tensor([vector_of[(c.source, c.site, c.layer)] for c in chunk_cells])
            groups = []
            for g in _forward_groups([(scope.target_site, c.target_layer) for c in chunk_cells]):
                maps = None
                if map_of is not None and chunk_cells[0].transform == "affine":
                    index = [map_of[(chunk_cells[i].layer, chunk_cells[i].target_layer)] for i in g]
                    maps = [(m, torch.tensor([j for j, k in enumerate(index) if k == m])) for m in dict.fromkeys(index)]
                groups.append(_Group(scope.target_site, chunk_cells[g[0]].target_layer, torch.tensor(g), columns[g],
                                     vector_ids[g], maps))  # fmt: skip
            seeds = None
            if scope.do_sample:
                seeds = torch.tensor([cell_seed(scope.seed or 0, c) for c in chunk_cells], dtype=torch.int64)
            alphas = torch.tensor([c.alpha for c in chunk_cells])
            passes.append(_Pass(groups, alphas=alphas, transform=chunk_cells[0].transform, seeds=seeds, **inputs))
            covered += chunk
    return passes, covered, prefixes


def read_vectors(model, prompts: list[str], reads: list[tuple[int, int, str, int]], batch_size: int = 64,
                 remote: bool | str = False) -> torch.Tensor:  # fmt: skip
    """Vectors ``[len(reads), d]`` for ``(prompt index, token index, site, layer)`` reads.

    Each prompt runs once, ``batch_size`` prompts per pass, and a pass saves its reads as
    one stacked tensor, so a remote run downloads only these vectors (in one request)."""
    passes = _read_passes(model.tokenizer, prompts, reads, batch_size)
    with torch.inference_mode():
        if not remote:
            return _execute_reads(model, passes, len(reads))[0]
        from superscopes import remote as ndif

        with ndif.request(model, remote, ship=(graph, readouts), name=model_name(model)) as options:
            with model.session(**options):
                table = nnsight.save(_execute_reads(model, passes, len(reads))[0])
        return table


def _directions(scope: Scope, keys: list[tuple[Source, str, int]], size: int) -> torch.Tensor:
    """The ``random`` control's direction for each vector, seeded by what the vector is (so it
    does not depend on which other cells run with it)."""
    directions = torch.empty(len(keys), size)
    for i, (src, site, layer) in enumerate(keys):
        seed = zlib.crc32(f"{scope.seed or 0}|{src.prompt}|{src.position}|{site}|{layer}".encode())
        directions[i] = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return directions


@dataclass
class _Prepared:
    """The client's side of a request: the cells it covers and how to decode its outputs."""

    plan: Plan  # the request's cells only
    work: _Work
    covered: list[int]  # cell index of each patched row, in pass order
    vector_of: dict[tuple[Source, str, int], int]


def _prepare(model, target_model, the_plan: Plan, chosen: list[int]) -> _Prepared:
    """Plan the passes that read, patch and decode the cells ``chosen`` (indices into the plan)."""
    scope = the_plan.scope
    sub = Plan(scope, the_plan.sources, [the_plan.cells[i] for i in chosen], the_plan.targets)
    cells = sub.cells
    keys = sorted({(c.source, c.site, c.layer) for c in cells}, key=lambda k: (k[0].prompt, k[0].position, k[1], k[2]))
    vector_of = {k: i for i, k in enumerate(keys)}
    reads = [(src.prompt, src.position, site, layer) for src, site, layer in keys]
    external_only = scope.vectors is not None  # named external vectors: nothing to read
    read_passes = [] if external_only else _read_passes(model.tokenizer, scope.prompts, reads, scope.batch_size)
    map_of, maps = None, [(scope.affine_weight, scope.affine_bias)]
    if isinstance(scope.affine_weight, dict):  # one map per layer pair
        used = list(dict.fromkeys((c.layer, c.target_layer) for c in cells if c.transform == "affine"))
        map_of = {pair: i for i, pair in enumerate(used)}
        biases = scope.affine_bias or {}
        maps = [(scope.affine_weight[pair], biases.get(pair)) for pair in used]
    patch_passes, covered, prefixes = _patch_passes(target_model, sub, vector_of, map_of)
    latent, directions = None, None
    if "latent" in scope.transforms:
        sae, index = scope.sae_latent
        latent = sae.latent_params(index)
    if "random" in scope.transforms:
        directions = _directions(scope, keys, hidden_size(target_model))
    chosen_readouts = tuple(_readouts(scope))
    settings = Settings(
        readouts=chosen_readouts,
        generate=any(r.generates for r in chosen_readouts),
        max_new_tokens=scope.max_new_tokens,
        top_k=scope.top_k,
        temperature=scope.temperature,
        mode=scope.mode,
        pad_token_id=target_model.tokenizer.pad_token_id,
        maps=tuple(maps),
        directions=directions,
        latent=latent,
        intervene=scope.intervene,
    )
    external = None if scope.vectors is None else scope.vectors[[k[0].prompt for k in keys]].detach().float().cpu()
    work = _Work(read_passes, len(keys), external, patch_passes, prefixes, settings)
    return _Prepared(sub, work, covered, vector_of)


def _check_stats(stats: dict, scope: Scope, target_model) -> None:
    """Client side, before any cell is reported: refuse overflowing alphas, warn about a silent latent."""
    refuse_overflow(stats["entry"], stats["norm"], scope.alphas, getattr(target_model, "dtype", torch.float32))
    if stats["silent"]:
        _warn_latent_silent(scope)


def _warn_latent_silent(scope: Scope) -> None:
    sae, latent = scope.sae_latent
    warnings.warn(f"transform 'latent': latent {latent} of {sae!r} is zero on every read vector of this grid, so "
                  "its alphas change nothing (pick a latent active there: sae.decompose(vector))", stacklevel=5)


def _collect(model, target_model, prepared: _Prepared, outputs: list, read: dict) -> list[dict]:
    """Decode a request's outputs into one dict of columns per cell (in the request's order):
    each readout's columns, then what ``intervene`` returned."""
    cells = prepared.plan.cells
    chosen = prepared.work.settings.readouts
    per_cell: list[dict] = [{} for _ in cells]
    flat = iter(prepared.covered)
    for computed, values in outputs:
        rows = len(next(iter(computed.values()))[0])
        values = _intervened(values, rows)
        for row in range(rows):
            i = next(flat)
            for readout in chosen:
                if readout.stage == "patch":
                    try:
                        per_cell[i].update(readout.decode(target_model.tokenizer, computed[readout.name], row))
                    except ScopeError as error:  # e.g. a NaN readout: name the cell
                        raise ScopeError(f"cell {cells[i]} {error}") from None
            per_cell[i].update({name: value[row] for name, value in values.items()})
    for readout in chosen:  # the source vector's own readouts, beside what the patch made of it
        if readout.stage == "read" and readout.name in read:
            for i, cell in enumerate(cells):
                vector = prepared.vector_of[(cell.source, cell.site, cell.layer)]
                per_cell[i].update(readout.decode(model.tokenizer, read[readout.name], vector))
    return per_cell


def _own_columns() -> set[str]:
    """The frame's own columns: the grid's, and every registered readout's."""
    return {*RESULT_COLUMNS, "target_model", *(c for r in readouts.REGISTRY.values() for c in r.columns)}


def _intervened(values, rows: int) -> dict[str, list]:
    """What ``intervene`` returned in a pass, as one value per batch row for each column."""
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ScopeError(f"intervene must return None or a dict of tensors by column name, got {type(values).__name__}")
    columns = {}
    for name, value in values.items():
        if name in _own_columns():
            raise ScopeError(f"intervene's column {name!r} is one of the frame's own: choose another name")
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or len(value) != rows:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ScopeError(f"intervene's {name!r} must be a tensor with one row per batch row ({rows}), got {shape}")
        columns[name] = [row.item() if row.dim() == 0 else row.tolist() for row in value.detach().float().cpu()]
    return columns


def _run_cells(model, target_model, the_plan: Plan, chosen: list[int], remote: bool | str, timeout: float | None,
               bar) -> list[dict]:  # fmt: skip
    """Read, patch and decode the cells ``chosen`` (indices into the plan); one remote request."""
    prepared = _prepare(model, target_model, the_plan, chosen)
    with torch.inference_mode():
        if remote:
            from superscopes import remote as ndif

            work = prepared.work
            # One request: the session runs every pass (the graph's and the readouts' code, sent by
            # value) on the server and returns only what the readouts saved.
            shipped = _shipped(the_plan.scope)
            with ndif.request(model, remote, ship=shipped, timeout=timeout, name=model_name(model)) as options:
                with model.session(**options):
                    result = nnsight.save(_execute(model, target_model, work))
            outputs, read, stats = result
            bar.update(len(prepared.plan.cells))
        else:
            with warnings.catch_warnings():
                # intervene's loop over max_new_tokens steps is cut short, by design, when every row ends early
                warnings.filterwarnings("ignore", message=".*was never reached: the loop asked for a step")
                outputs, read, stats = _execute(model, target_model, prepared.work, bar.update, the_plan.scope.alphas)
    _check_stats(stats, the_plan.scope, target_model)
    return _collect(model, target_model, prepared, outputs, read)


class Grid:
    """A grid planned to run inside your own nnsight session, beside your own traces::

        grid = superscopes.Grid(model, scope)          # validated and planned: no forward pass yet
        with model.session(remote=...) as session:     # False, "local" or True (NDIF)
            ...                                        # your own traces
            outputs = grid.run()                       # the grid's passes, in this session
        frame = grid.frame(outputs)                    # the frame superscopes.run returns

    A session runs its body when it exits (on the server, for a remote one), so the frame
    exists only after it: ``run`` returns the raw outputs (saved, so they leave the session)
    and ``frame`` decodes them. The whole grid is one request (no ``cells_per_request`` or
    ``checkpoint``: use ``superscopes.run`` for those). To edit the model the grid sees (an
    ablation), give the scope an ``intervene`` function: a trace of yours elsewhere in the
    session does not reach the grid's passes. Torch's thread count is left as it is (the
    session may run on a server): ``superscopes.run``'s ``threads`` does not apply."""

    def __init__(self, model, scope: Scope, target_model=None):
        self._model, self._target_model = model, target_model or model
        self._plan = plan(model, scope, self._target_model)
        self._prepared = _prepare(model, self._target_model, self._plan, list(range(len(self._plan.cells))))
        self._work = self._prepared.work
        from superscopes.remote import send_by_value

        send_by_value(*_shipped(scope))  # remote sessions (and remote="local") send the graph's passes by value

    def run(self) -> tuple:
        """Run the grid's reads and patch passes (inside a session: when it runs its body;
        outside one, here and now)."""
        outputs = _execute(self._model, self._target_model, self._work)
        return nnsight.save(outputs) if _tracing() else outputs

    def frame(self, outputs: tuple) -> pd.DataFrame:
        """The grid's frame (as ``superscopes.run`` returns it) from what ``run`` returned."""
        if not (isinstance(outputs, tuple) and len(outputs) == 3):
            raise ScopeError("frame() takes what grid.run() returned inside the session (outputs = grid.run())")
        patched, read, stats = outputs
        _check_stats(stats, self._plan.scope, self._target_model)
        per_cell = _collect(self._model, self._target_model, self._prepared, patched, read)
        return _frame(self._model, self._target_model, self._plan, per_cell)

    def __len__(self) -> int:
        return len(self._plan.cells)

    def __reduce__(self) -> tuple:
        # What a remote session sends: a graph.ShippedGrid with only what run() needs (the plan
        # holds the scope's callables and tensors, which the server has no use for), so this
        # module need not ship.
        return graph.ShippedGrid, (self._model, self._target_model, self._work)


def _fingerprint(model, target_model, the_plan: Plan) -> str:
    """A hash of everything that decides a grid's outputs (not how it is batched)."""
    scope = the_plan.scope
    digest = hashlib.sha256()
    targets = [[t.text, t.index] for t in the_plan.targets]
    settings = [model_name(model), model_name(target_model), scope.prompts, targets,
                scope.target_site, scope.mode, scope.output, scope.max_new_tokens, scope.top_k, scope.do_sample,
                scope.temperature, scope.seed, scope.logit_lens]  # fmt: skip
    if scope.readouts:  # a grid without further readouts keeps the fingerprint it had before they existed
        settings.append(list(scope.readouts))
    digest.update(json.dumps(settings, default=str).encode())
    if scope.intervene is not None:  # the function's name and bytecode: another intervention, another grid
        code = getattr(scope.intervene, "__code__", None)
        digest.update(getattr(scope.intervene, "__qualname__", repr(scope.intervene)).encode())
        digest.update(code.co_code if code is not None else b"")
    if scope.vectors is not None:
        digest.update(scope.vectors.detach().cpu().float().contiguous().numpy().tobytes())
    for cell in the_plan.cells:
        digest.update(repr(cell).encode())
    maps = scope.affine_weight if isinstance(scope.affine_weight, dict) else {None: scope.affine_weight}
    biases = scope.affine_bias if isinstance(scope.affine_bias, dict) else {None: scope.affine_bias}
    for table in (maps, biases):
        for key, tensor in sorted(table.items(), key=lambda item: str(item[0])):
            if tensor is not None:
                digest.update(str(key).encode() + tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _check_served(*models) -> None:
    """A model with its weights here (loaded without ``remote=True``) cannot run on NDIF:
    nnsight would ask the server for its local cache path. Checked before any file is written."""
    for m in models:
        module = getattr(m, "_module", None)
        weights = next(module.parameters(), None) if module is not None else None
        if weights is not None and weights.device.type != "meta":
            raise ScopeError(
                f"{model_name(m)} was loaded with its weights on this machine; to run it on NDIF, load it "
                "with superscopes.load(NAME, remote=True) (remote=\"local\" runs a local model's request here)"
            )


def _tracing() -> bool:
    """Whether this thread is inside an nnsight session or trace body (or an invoke of one)."""
    from nnsight.tracing import tracer  # nnsight 0.8's per-thread nesting depth (read only)

    return getattr(tracer._local, "depth", 0) > 0


def run(model, scope: Scope, target_model=None, remote: bool | str = False, progress: bool = True,
        cells_per_request: int | None = None, checkpoint: str | Path | None = None,
        timeout: float | None = None, threads: int | None = DEFAULT_THREADS) -> pd.DataFrame:  # fmt: skip
    """Run the grid; one row per cell (see ``RESULT_COLUMNS``), in grid order.

    ``target_model``: patch into another model (cross-model; needs ``affine`` across
    hidden sizes). ``remote``: ``True`` for NDIF, ``"local"`` to test remote-safety; a
    remote request (an nnsight session) returns only token ids and top-k probabilities.
    ``cells_per_request``: split the grid into requests of at most this many cells (default:
    the whole grid is one request), e.g. to stay within a server's time limit.
    ``checkpoint``: a file that keeps every finished request's cells as it returns; a rerun
    with the same grid resumes from it, a different grid is refused. ``timeout``: seconds a
    remote request may take before the client gives up (default: wait as long as it runs).
    ``threads``: torch CPU threads while the grid runs (restored after), the CLI's and the
    recipes' default too (``parsing.DEFAULT_THREADS``); ``None`` keeps torch's setting."""
    from tqdm.auto import tqdm

    if _tracing():
        raise ScopeError(
            "superscopes.run runs its own traces and returns a frame, which a session or trace cannot hand out: "
            "plan it before the session with grid = superscopes.Grid(model, scope), call outputs = grid.run() "
            "inside it, and frame = grid.frame(outputs) after it"
        )
    target_model = target_model or model
    if remote and remote != "local":
        _check_served(model, target_model)
    the_plan = plan(model, scope, target_model)
    if cells_per_request is not None and (not isinstance(cells_per_request, int) or cells_per_request < 1):
        raise ScopeError(f"cells_per_request must be a positive integer, got {cells_per_request!r}")
    if timeout is not None and not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ScopeError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ScopeError(f"threads must be a positive integer (or None for torch's own setting), got {threads!r}")
    n = len(the_plan.cells)
    from superscopes.results import Checkpoint  # here: results imports pandas

    store = Checkpoint(checkpoint, _fingerprint(model, target_model, the_plan), n) if checkpoint else None
    per_cell: list[dict | None] = [None] * n
    for i, out in (store.load() if store else {}).items():
        per_cell[i] = out
    todo = [i for i in range(n) if per_cell[i] is None]
    size = cells_per_request or max(len(todo), 1)
    bar = tqdm(total=n, initial=n - len(todo), desc="superscopes", unit="cell", disable=not progress)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for start in range(0, len(todo), size):
            chosen = todo[start : start + size]
            outputs = _run_cells(model, target_model, the_plan, chosen, remote, timeout, bar)
            for i, out in zip(chosen, outputs):
                per_cell[i] = out
            if store:
                store.append(chosen, outputs)
    finally:
        torch.set_num_threads(previous)
        bar.close()
    return _frame(model, target_model, the_plan, per_cell)


def _frame(model, target_model, the_plan: Plan, per_cell: list[dict]) -> pd.DataFrame:
    scope = the_plan.scope
    name, target_name = model_name(model), model_name(target_model)
    records = []
    for cell, out in zip(the_plan.cells, per_cell):
        src = cell.source
        target = the_plan.targets[src.prompt]
        record = {
            "model": name,
            "source": scope.prompts[src.prompt],
            "token": src.token,
            "position": src.position,
            "site": cell.site,
            "layer": cell.layer,
            "target": "source" if target.text is None else target.text,
            "target_layer": cell.target_layer,
            "target_site": scope.target_site,
            "target_position": src.position if target.index is None else target.index,
            "transform": cell.transform,
            "alpha": cell.alpha,
            "mode": scope.mode,
            "sample": cell.sample,
            **out,
        }
        if target_model is not model:
            record["target_model"] = target_name
        records.append(record)
    import pandas as pd

    return pd.DataFrame.from_records(records)
