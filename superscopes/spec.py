"""The grid's specification: ``Scope``, its cells and targets, and ``plan``, which validates a
scope against the model(s) and expands it into cells before any forward pass."""

from __future__ import annotations

import itertools
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from superscopes import ops
from superscopes.models import model_name
from superscopes.parsing import DEFAULT_BATCH_SIZE
from superscopes.prompts import TEMPLATES, TokenNotFoundError, find_token, num_tokens, tokens
from superscopes.readouts.base import REGISTRY, Readout
from superscopes.sites import ScopeError, architecture_of, hidden_size, num_layers

if TYPE_CHECKING:
    from superscopes.models import Model

TargetLayer = int | Literal["same"]

RESULT_COLUMNS = [
    "model",
    "source",
    "token",
    "position",
    "site",
    "layer",
    "target",
    "target_layer",
    "target_site",
    "target_position",
    "transform",
    "alpha",
    "mode",
    "sample",
    "output",
    "output_ids",
]


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

    #: source prompts (one string or several)
    prompts: Sequence[str] | str
    #: source token: a substring, first match, its last token; or one per prompt
    token: str | Sequence[str] | None = None
    #: source position: index into the tokenised prompt (BOS included; negative from the end)
    position: int | Sequence[int] | None = None
    #: every token of each prompt is a source position
    all_tokens: bool = False
    #: where vectors are read (superscopes.sites.SITE_NAMES)
    sites: Sequence[str] = ("mlp_out", "resid_post")
    #: source layers
    layers: Sequence[int] | Literal["all"] = "all"
    #: amplification factors
    alphas: Sequence[float] = (1, 3, 6, 9, 12, 15)
    #: how each read vector becomes the written one (ops.TRANSFORMS, or none)
    transforms: Sequence[str] = ("scale",)
    #: target prompt: a template name, template text, "source", or one per prompt
    target: str | Sequence[str] = "entity"
    #: the target template's placeholder (default: the template's own)
    placeholder: str | None = None
    #: where in the target the vector is written
    target_position: Literal["placeholder", "last"] | int = "placeholder"
    #: target layers: indices or "same" (the source layer)
    target_layers: Sequence[TargetLayer] = (0,)
    #: explicit (layer, target_layer) pairs instead of layers x target_layers
    layer_pairs: Sequence[tuple[int, int]] | None = None
    #: where the vector is written
    target_site: str = "resid_post"
    #: replace the target's vector, or add to it
    mode: Literal["replace", "add"] = "replace"
    #: the primary readout (superscopes.readouts)
    output: Literal["generate", "topk"] = "generate"
    #: tokens generated per cell (output generate)
    max_new_tokens: int = 10
    #: tokens kept by top-k readouts (output topk, the lens)
    top_k: int = 10
    #: sample instead of greedy decoding
    do_sample: bool = False
    #: sampling temperature (do_sample)
    temperature: float = 1.0
    #: sampled texts per cell (do_sample)
    samples: int = 1
    #: seed of sampling and of random directions
    seed: int | None = None
    #: patched rows per forward pass
    batch_size: int = DEFAULT_BATCH_SIZE
    #: run the target prompt's prefix once and reuse its KV cache
    share_prefix: bool = True
    #: add the read vectors' own logit lens (the lens readout)
    logit_lens: bool = False
    #: external source vectors [len(prompts), d] instead of read ones
    vectors: torch.Tensor | None = field(default=None, repr=False)
    #: a grid larger than this is refused before any forward pass
    max_cells: int = 20_000
    #: the affine transform's map: one, or one per (layer, target_layer)
    affine_weight: torch.Tensor | dict[tuple[int, int], torch.Tensor] | None = field(default=None, repr=False)
    #: the affine transform's bias, as affine_weight
    affine_bias: torch.Tensor | dict[tuple[int, int], torch.Tensor] | None = field(default=None, repr=False)
    #: keep only the cells it returns True for
    where: Callable[[Cell], bool] | None = field(default=None, repr=False)
    #: (sae, latent) for the latent transform
    sae_latent: tuple | None = field(default=None, repr=False)
    #: your own trace code, called in every forward pass of the grid
    intervene: Callable[[object], dict[str, torch.Tensor] | None] | None = field(default=None, repr=False)
    #: further readouts by name (superscopes.readouts.available())
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
            self.layer_pairs = [
                tuple(_integer(x) for x in pair) if isinstance(pair, (list, tuple)) else pair
                for pair in self.layer_pairs
            ]


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
    readouts: tuple[Readout, ...] = ()  # prepared (Readout.prepare), the primary one first

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


def _check_layers(name: str, layers: Sequence, model: Model) -> None:
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
    raise ScopeError(f"target_position {scope.target_position!r} is not 'placeholder', 'last' or an index in 0-{n - 1}")


def _layer_pairs(scope: Scope, model: Model, target_model: Model) -> list[tuple[int, int]]:
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
            raise ScopeError(
                f"prompt {index} {prompt!r} has a character that is not valid text "
                f"({prompt[error.start]!r} at {error.start}, a lone surrogate)"
            ) from None
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


def _check_numbers(scope: Scope, target_model: Model) -> None:
    """Generation settings, named with their valid range."""

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if scope.do_sample and not (
        isinstance(scope.temperature, (int, float)) and math.isfinite(scope.temperature) and scope.temperature > 0
    ):
        raise ScopeError(f"temperature {scope.temperature!r} must be a finite number above 0")
    if scope.output == "generate" and not (is_int(scope.max_new_tokens) and scope.max_new_tokens >= 1):
        raise ScopeError(f"max_new_tokens {scope.max_new_tokens!r} must be a whole number, at least 1")
    limit = torch.finfo(getattr(target_model, "dtype", torch.float32)).max
    for alpha in scope.alphas:
        if isinstance(alpha, (int, float)) and abs(alpha) >= limit:
            raise ScopeError(f"alpha {alpha!r} overflows the model's dtype (largest value {limit:.3g})")


def _check_affine(scope: Scope, model: Model, target_model: Model, pairs: list[tuple[int, int]]) -> None:
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
        for key, tensor in value.items() if isinstance(value, dict) else [(None, value)]:
            label = name if key is None else f"{name}[{key}]"
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ScopeError(f"{label} must be a tensor of shape {list(shape)}, got {got}")
            if not torch.isfinite(tensor).all():
                raise ScopeError(f"{label} has non-finite values (nan or inf)")


def _check_context(scope: Scope, model: Model, target_model: Model, targets: list[Target]) -> None:
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


def _check_vectors(scope: Scope, pairs: list[tuple[int, int]], targets: list[str], model: Model) -> None:
    shape, wanted = tuple(getattr(scope.vectors, "shape", ())), (len(scope.prompts), hidden_size(model))
    if shape != wanted:
        raise ScopeError(f"vectors has shape {shape}; give one {wanted[1]}-vector per prompt (name): {wanted}")
    if len(scope.sites) != 1 or len({layer for layer, _ in pairs}) != 1:
        raise ScopeError("vectors belong to one site and layer: give exactly one site and one source layer")
    if "source" in targets or scope.logit_lens:
        raise ScopeError('target "source" and logit_lens need read vectors; with vectors, use a target template')


def _check_latent(scope: Scope, model: Model, pairs: list[tuple[int, int]]) -> None:
    """The ``latent`` transform's SAE fits the model, the latent exists, and every source
    vector is read where the SAE was trained (its site and layer)."""
    if "latent" not in scope.transforms:
        return
    if not (isinstance(scope.sae_latent, tuple) and len(scope.sae_latent) == 2):
        raise ScopeError(
            "transform 'latent' needs sae_latent=(sae, latent index), e.g. (superscopes.sae.load(...), 345)"
        )
    sae, latent = scope.sae_latent
    sae.check(model)
    sae._latents([latent])
    wrong = sorted({(site, layer) for site in scope.sites for layer, _ in pairs} - {(sae.site, sae.layer)})
    if wrong:
        raise ScopeError(
            f"transform 'latent' amplifies a latent of an SAE on {sae.site} layer {sae.layer}; the grid "
            f"reads {wrong[:5]} too: use sites=[{sae.site!r}], layers=[{sae.layer}]"
        )


def plan(model: Model, scope: Scope, target_model: Model | None = None) -> Plan:
    """Validate ``scope`` against the model(s) and expand it into cells. No forward pass, but
    for what a readout prepares once everything is valid (``Readout.prepare``: the affine
    lens fits its maps when none were given)."""
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
    _choices("output", scope.output, [r.name for r in REGISTRY.values() if r.primary])
    for name in scope.readouts:
        _choices("readout", name, [r.name for r in REGISTRY.values() if not r.primary])
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
    cells = [
        Cell(src, site, layer, transform, float(alpha), target_layer, sample)
        for src, site, (layer, target_layer), transform, alpha, sample in grid
    ]
    if scope.where is not None:
        cells = [cell for cell in cells if scope.where(cell)]
        if not cells:
            raise ScopeError("`where` kept none of the grid's cells")
    planned = Plan(scope, sources, cells, [resolved[t] for t in targets_wanted])
    # Last, once everything is valid: what a readout loads or fits (an SAE, a lens's maps).
    planned.readouts = tuple(readout.prepare(planned, model, target_model) for readout in _readouts(scope))
    return planned


def _readouts(scope: Scope) -> list[Readout]:
    """The scope's readouts, the primary one (``output``) first; ``logit_lens`` is ``lens``."""
    names = [scope.output, *(["lens"] if scope.logit_lens else []), *scope.readouts]
    return [REGISTRY[name] for name in dict.fromkeys(names)]
