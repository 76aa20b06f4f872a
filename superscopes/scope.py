"""The amplify-and-patch graph: read -> transform -> write -> continue, as batched nnsight traces.

A ``Scope`` describes a grid: source prompts x token positions x sites x layers x transforms
x alphas x target layers (x sampled tries). ``run`` executes it in two stages:

1. *Read*: every source prompt runs once (batched), and every vector any cell needs is
   read in that pass.
2. *Patch*: cells become rows of batched target passes (one ``generate`` or ``trace`` per
   chunk of ``batch_size`` rows). Inside a pass, each (target layer, target site) group of
   rows gets its transformed vectors written in forward order.

Because the vectors are read in a separate pass, the target layer may be below the source
layer (back-patching) and the target may be another model (cross-model patching).
Every cell is validated before any forward pass.
"""

from __future__ import annotations

import itertools
import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import nnsight
import pandas as pd
import torch

from superscopes import ops
from superscopes.models import model_name
from superscopes.prompts import TEMPLATES, TokenNotFoundError, find_token, num_tokens, tokens
from superscopes.sites import SITE_NAMES, architecture_of, num_layers, resolve

TargetLayer = int | Literal["same"]

RESULT_COLUMNS = [
    "model", "source", "token", "position", "site", "layer", "target", "target_layer", "target_site",
    "target_position", "transform", "alpha", "mode", "sample", "output", "output_ids",
]  # fmt: skip


class ScopeError(ValueError):
    """A grid that cannot run; raised before any forward pass."""


@dataclass
class Scope:
    """A Superscopes / Patchscopes grid. Defaults follow the Superscopes paper.

    Source positions: ``token`` (substring, first match, last token of it), ``position``
    (index into the tokenised prompt, BOS included, negative from the end), ``all_tokens``,
    else the last token.
    ``target``: a template name (``entity``, ``identity``), template text containing
    ``placeholder``, or ``"source"`` to write back into the source prompt at the source
    position (back-patching). ``target_position``: ``placeholder``, ``last`` or an index.
    ``output``: ``generate`` (``max_new_tokens`` tokens) or ``topk`` (next-token top-k).
    """

    prompts: Sequence[str] | str
    token: str | None = None
    position: int | None = None
    all_tokens: bool = False
    sites: Sequence[str] = ("mlp_out", "resid_post")
    layers: Sequence[int] | Literal["all"] = "all"
    alphas: Sequence[float] = (1, 3, 6, 9, 12, 15)
    transforms: Sequence[str] = ("scale",)
    target: str = "entity"
    placeholder: str | None = None
    target_position: Literal["placeholder", "last"] | int = "placeholder"
    target_layers: Sequence[TargetLayer] = (0,)
    target_site: str = "resid_post"
    mode: Literal["replace", "add"] = "replace"
    output: Literal["generate", "topk"] = "generate"
    max_new_tokens: int = 10
    top_k: int = 10
    do_sample: bool = False
    temperature: float = 1.0
    samples: int = 1
    seed: int | None = None
    batch_size: int = 64
    max_cells: int = 20_000
    affine_weight: torch.Tensor | None = field(default=None, repr=False)
    affine_bias: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        self.prompts = list(self.prompts)
        for name in ("sites", "alphas", "transforms", "target_layers"):
            value = getattr(self, name)
            setattr(self, name, [value] if isinstance(value, (str, int, float)) else list(value))
        if not (isinstance(self.layers, str) and self.layers == "all"):
            self.layers = _integers(self.layers)
        self.target_layers = [t if t == "same" else _integer(t) for t in self.target_layers]
        # numpy / torch scalars as Python numbers (np.arange alphas); text and None stay, for validation
        self.alphas = [float(a) if isinstance(a, numbers.Real) and not isinstance(a, bool) else a for a in self.alphas]


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
class _Source:
    prompt: int  # index into Scope.prompts
    position: int  # non-negative token index
    token: str


@dataclass(frozen=True)
class _Cell:
    source: _Source
    site: str
    layer: int
    transform: str
    alpha: float
    target_layer: int
    sample: int


@dataclass
class _Plan:
    scope: Scope
    sources: list[_Source]
    cells: list[_Cell]
    target_text: str | None  # None: each cell targets its own source prompt
    target_index: int | None  # token index in target_text (None: per cell)


# ---------------------------------------------------------------- validation


def _choices(name: str, value, valid: Sequence) -> None:
    if value not in valid:
        raise ScopeError(f"{name} {value!r} is not valid; choose from {', '.join(map(str, valid))}")


def _check_layers(name: str, layers: Sequence, model) -> None:
    n = num_layers(model)
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
            raise ScopeError(f"{name} {layer!r} is out of range: {model_name(model)} has layers 0-{n - 1}")


def _sources(scope: Scope, tokenizer) -> list[_Source]:
    chosen = sum([scope.token is not None, scope.position is not None, scope.all_tokens])
    if chosen > 1:
        raise ScopeError("give at most one of token, position and all_tokens")
    sources = []
    for index, prompt in enumerate(scope.prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ScopeError(f"prompt {index} is empty: {prompt!r}")
        pieces = tokens(tokenizer, prompt)
        if scope.all_tokens:
            positions = list(range(len(pieces)))
        elif scope.token is not None:
            try:
                positions = [find_token(tokenizer, prompt, scope.token)]
            except TokenNotFoundError as error:
                raise ScopeError(str(error)) from None
        elif scope.position is not None:
            if not -len(pieces) <= scope.position < len(pieces):
                raise ScopeError(
                    f"position {scope.position} is outside prompt {prompt!r} ({len(pieces)} tokens: {pieces})"
                )
            positions = [scope.position % len(pieces)]
        else:
            positions = [len(pieces) - 1]
        sources += [_Source(index, p, pieces[p]) for p in positions]
    return sources


def _target(scope: Scope, tokenizer) -> tuple[str | None, int | None]:
    if scope.target == "source":
        if scope.target_position != "placeholder":
            raise ScopeError('target "source" writes at the source position; leave target_position as "placeholder"')
        return None, None
    template = TEMPLATES.get(scope.target)
    text = template.text if template else scope.target
    placeholder = scope.placeholder or (template.placeholder if template else "x")
    if not text.strip():
        raise ScopeError("the target prompt is empty")
    n = num_tokens(tokenizer, text)
    if scope.target_position == "placeholder":
        try:
            return text, find_token(tokenizer, text, placeholder, last_occurrence=True)
        except TokenNotFoundError:
            raise ScopeError(
                f"target {text!r} has no placeholder {placeholder!r}: put it where the vector goes, "
                "or set target_position to 'last' or an index"
            ) from None
    if scope.target_position == "last":
        return text, n - 1
    if isinstance(scope.target_position, int) and -n <= scope.target_position < n:
        return text, scope.target_position % n
    raise ScopeError(
        f"target_position {scope.target_position!r} is not 'placeholder', 'last' or an index in 0-{n - 1}"
    )


def _check_not_empty(scope: Scope) -> None:
    for name in ("sites", "alphas", "transforms", "target_layers"):
        if not getattr(scope, name):
            raise ScopeError(f"no {name} given: an empty {name} list would make an empty grid")


def _check_numbers(scope: Scope, target_model) -> None:
    """Generation settings, named with their valid range."""

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    vocab = target_model.config.vocab_size
    if scope.output == "topk" and not (is_int(scope.top_k) and 1 <= scope.top_k <= vocab):
        raise ScopeError(f"top_k {scope.top_k!r} must be a whole number in 1-{vocab} (the vocabulary size)")
    if scope.do_sample and not (isinstance(scope.temperature, (int, float)) and math.isfinite(scope.temperature)
                                and scope.temperature > 0):  # fmt: skip
        raise ScopeError(f"temperature {scope.temperature!r} must be a finite number above 0")
    if scope.output == "generate" and not (is_int(scope.max_new_tokens) and scope.max_new_tokens >= 1):
        raise ScopeError(f"max_new_tokens {scope.max_new_tokens!r} must be a whole number, at least 1")
    if not is_int(scope.samples):
        raise ScopeError(f"samples {scope.samples!r} must be a whole number, at least 1")
    limit = torch.finfo(getattr(target_model, "dtype", torch.float32)).max
    for alpha in scope.alphas:
        if isinstance(alpha, (int, float)) and abs(alpha) >= limit:
            raise ScopeError(f"alpha {alpha!r} overflows the model's dtype (largest value {limit:.3g})")


def _check_affine(scope: Scope, model, target_model) -> None:
    """The map's shape is [target hidden, source hidden] (bias [target hidden]), all finite."""
    if "affine" not in scope.transforms:
        return
    shapes = {"affine_weight": (target_model.config.hidden_size, model.config.hidden_size),
              "affine_bias": (target_model.config.hidden_size,)}  # fmt: skip
    for name, shape in shapes.items():
        value = getattr(scope, name)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ScopeError(f"{name} must be a tensor of shape {list(shape)}, got {got}")
        if not torch.isfinite(value).all():
            raise ScopeError(f"{name} has non-finite values (nan or inf)")


def _check_context(scope: Scope, model, target_model, target_text: str | None) -> None:
    """Every prompt, plus the generated tokens where they follow it, fits the model's context."""
    new = scope.max_new_tokens if scope.output == "generate" else 0
    checks = [(model, prompt, 0) for prompt in scope.prompts]
    checks += [(target_model, prompt, new) for prompt in ([target_text] if target_text else scope.prompts)]
    for m, text, extra in checks:
        limit = getattr(m.config, "max_position_embeddings", None)
        if limit is not None and num_tokens(m.tokenizer, text) + extra > limit:
            raise ScopeError(
                f"prompt {text[:60]!r}{'...' if len(text) > 60 else ''} has {num_tokens(m.tokenizer, text)} tokens (+{extra} generated): over "
                f"{model_name(m)}'s context of {limit} tokens"
            )


def check_amplified(vectors: torch.Tensor, alphas: Sequence[float], dtype: torch.dtype) -> None:
    """Refuse alphas whose product with a read vector overflows ``dtype`` (after the read pass)."""
    largest = vectors.abs().max().item() * max(abs(a) for a in alphas) if len(vectors) else 0.0
    if not largest < torch.finfo(dtype).max:
        raise ScopeError(
            f"alpha {max(alphas, key=abs)} times the read vectors (largest entry {vectors.abs().max().item():.3g}) "
            f"overflows {dtype} (largest value {torch.finfo(dtype).max:.3g}); use smaller alphas"
        )


def plan(scope: Scope, model, target_model=None) -> _Plan:
    """Validate ``scope`` against the model(s) and expand it into cells. No forward pass."""
    target_model = target_model or model
    if not scope.prompts:
        raise ScopeError("no prompts given")
    _check_not_empty(scope)
    source_arch, target_arch = architecture_of(model), architecture_of(target_model)
    for site in scope.sites:
        _choices("site", site, list(source_arch.sites))
    _choices("target_site", scope.target_site, list(target_arch.sites))
    for transform in scope.transforms:
        _choices("transform", transform, ops.TRANSFORMS)
    _choices("mode", scope.mode, ops.WRITE_MODES)
    _choices("output", scope.output, ["generate", "topk"])
    layers = list(range(num_layers(model))) if scope.layers == "all" else scope.layers
    if not layers:
        raise ScopeError("no layers given")
    _check_layers("layer", layers, model)
    fixed_targets = [t for t in scope.target_layers if t != "same"]
    _check_layers("target_layer", fixed_targets, target_model)
    if "same" in scope.target_layers and num_layers(target_model) < max(layers) + 1:
        raise ScopeError(f"target_layer 'same' needs layer {max(layers)} in {model_name(target_model)}")
    for alpha in scope.alphas:
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ScopeError(f"alpha {alpha!r} is not a finite number")
    if "affine" in scope.transforms and scope.affine_weight is None:
        raise ScopeError("transform 'affine' needs affine_weight (and optionally affine_bias)")
    if target_model is not model and scope.target == "source":
        raise ScopeError('target "source" means the source prompt in the source model; give a target template')
    if model.config.hidden_size != target_model.config.hidden_size and set(scope.transforms) != {"affine"}:
        raise ScopeError(
            f"hidden sizes differ ({model.config.hidden_size} vs {target_model.config.hidden_size}): "
            "only transform 'affine' can map between these models"
        )
    _check_numbers(scope, target_model)
    _check_affine(scope, model, target_model)
    if scope.samples < 1 or (scope.samples > 1 and not scope.do_sample):
        raise ScopeError(f"samples={scope.samples}: more than one try per cell needs do_sample=True")
    if scope.batch_size < 1:
        raise ScopeError(f"batch_size must be at least 1, got {scope.batch_size}")

    sources = _sources(scope, model.tokenizer)
    target_text, target_index = _target(scope, target_model.tokenizer)
    _check_context(scope, model, target_model, target_text)
    n_cells = len(sources) * len(scope.sites) * len(layers) * len(scope.transforms) * len(scope.alphas)
    n_cells *= len(scope.target_layers) * scope.samples
    if n_cells > scope.max_cells:
        raise ScopeError(
            f"the grid has {n_cells} cells ({len(sources)} source tokens x {len(scope.sites)} sites x "
            f"{len(layers)} layers x {len(scope.transforms)} transforms x {len(scope.alphas)} alphas x "
            f"{len(scope.target_layers)} target layers x {scope.samples} samples), over max_cells={scope.max_cells}"
        )
    # Built only after the count is checked: product() materialises its inputs (range(samples) too).
    grid = itertools.product(
        sources, scope.sites, layers, scope.transforms, scope.alphas, scope.target_layers, range(scope.samples)
    )
    cells = [
        _Cell(src, site, layer, transform, float(alpha), layer if t == "same" else t, sample)
        for src, site, layer, transform, alpha, t, sample in grid
    ]
    return _Plan(scope, sources, cells, target_text, target_index)


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


# A pass is planned on the client (tokenisation, rows, columns) as plain tensors, so that
# executing it is only nnsight traces and torch: the part that runs on NDIF.


@dataclass
class _Group:
    site: str
    layer: int
    rows: torch.Tensor  # batch rows
    columns: torch.Tensor  # token columns in the padded batch
    vectors: torch.Tensor  # read pass: where the values go in the vector table; patch pass: which vectors


@dataclass
class _Pass:
    texts: list[str]
    groups: list[_Group]
    alphas: torch.Tensor | None = None  # patch passes: one per batch row
    transform: str = "scale"
    seed: int | None = None


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
        passes.append(_Pass(texts, groups))
    return passes


def _patch_passes(target_model, the_plan: _Plan, vector_of: dict) -> tuple[list[_Pass], list[int]]:
    """Batched target passes (one transform each) and the cell order they cover."""
    scope, cells = the_plan.scope, the_plan.cells
    order = sorted(range(len(cells)), key=lambda i: scope.transforms.index(cells[i].transform))
    passes, covered = [], []
    for n, chunk in enumerate(
        chunk for _, same in itertools.groupby(order, key=lambda i: cells[i].transform)
        for chunk in _chunks(list(same), scope.batch_size)
    ):  # fmt: skip
        chunk_cells = [cells[i] for i in chunk]
        if the_plan.target_text is None:
            texts = [scope.prompts[c.source.prompt] for c in chunk_cells]
            positions = [c.source.position for c in chunk_cells]
        else:
            texts = [the_plan.target_text] * len(chunk)
            positions = [the_plan.target_index] * len(chunk)
        columns = _columns(_lengths(target_model.tokenizer, texts), list(range(len(chunk))), positions)
        vector_ids = torch.tensor([vector_of[(c.source, c.site, c.layer)] for c in chunk_cells])
        groups = [
            _Group(scope.target_site, chunk_cells[g[0]].target_layer, torch.tensor(g), columns[g], vector_ids[g])
            for g in _forward_groups([(scope.target_site, c.target_layer) for c in chunk_cells])
        ]
        seed = None if scope.seed is None else scope.seed + n
        passes.append(_Pass(texts, groups, torch.tensor([c.alpha for c in chunk_cells]), chunk_cells[0].transform, seed))
        covered += chunk
    return passes, covered


def _execute_reads(model, passes: list[_Pass], n_vectors: int, on_pass=None) -> torch.Tensor:
    """Run read passes; returns the vector table ``[n_vectors, d]``. Only traces and torch."""
    table = torch.empty(n_vectors, model.config.hidden_size)
    for p in passes:
        with model.trace(p.texts):
            values = [ops.read(model, g.site, g.layer, g.columns, g.rows) for g in p.groups]
            stacked = torch.cat(values).save()
        table[torch.cat([g.vectors for g in p.groups])] = stacked.to(table.dtype).cpu()
        if on_pass is not None:
            on_pass(len(p.texts))
    return table


def _apply_patches(target_model, p: _Pass, table: torch.Tensor, settings: dict) -> None:
    """Inside a trace: write each group's transformed vectors, in forward order."""
    for g in p.groups:
        extra = {}
        if p.transform == "affine":
            extra = {"weight": settings["weight"]}
            if settings["bias"] is not None:
                extra["bias"] = settings["bias"]
        elif p.transform == "random":
            extra = {"direction": settings["directions"][g.vectors]}
        ops.patch(target_model, g.site, g.layer, table[g.vectors], g.columns, g.rows,
                  alpha=p.alphas[g.rows], transform=p.transform, mode=settings["mode"], **extra)  # fmt: skip


def _execute_patches(target_model, passes: list[_Pass], table: torch.Tensor, settings: dict, on_pass=None) -> list:
    """Run patch passes; returns per pass the saved token ids (and top-k probabilities).

    ``settings``: output, max_new_tokens, top_k, do_sample, temperature, mode, pad_token_id,
    unembed (module path), affine weight/bias, random directions (per vector)."""
    outputs = []
    unembed = resolve(target_model, settings["unembed"])
    for p in passes:
        if p.seed is not None:
            torch.manual_seed(p.seed)
        if settings["output"] == "generate":
            kwargs = {"max_new_tokens": settings["max_new_tokens"], "do_sample": settings["do_sample"],
                      "pad_token_id": settings["pad_token_id"]}  # fmt: skip
            if settings["do_sample"]:
                kwargs["temperature"] = settings["temperature"]
            with target_model.generate(p.texts, **kwargs) as tracer:
                _apply_patches(target_model, p, table, settings)
                ids = tracer.result[:, -settings["max_new_tokens"] :].save()
            outputs.append((ids, None))
        else:
            with target_model.trace(p.texts):
                _apply_patches(target_model, p, table, settings)
                top = unembed.output[:, -1].float().softmax(-1).topk(settings["top_k"])
                ids, probs = top.indices.save(), top.values.save()
            outputs.append((ids, probs))
        if on_pass is not None:
            on_pass(len(p.texts))
    return outputs


def read_vectors(model, prompts: list[str], reads: list[tuple[int, int, str, int]], batch_size: int = 64,
                 remote: bool | str = False) -> torch.Tensor:  # fmt: skip
    """Vectors ``[len(reads), d]`` for ``(prompt index, token index, site, layer)`` reads.

    Each prompt runs once, ``batch_size`` prompts per pass, and a pass saves its reads as
    one stacked tensor, so a remote run downloads only these vectors (in one request)."""
    passes = _read_passes(model.tokenizer, prompts, reads, batch_size)
    with torch.inference_mode():
        if not remote:
            return _execute_reads(model, passes, len(reads))
        from superscopes.remote import configure, explain

        configure()
        try:
            with model.session(remote=remote):
                table = nnsight.save(_execute_reads(model, passes, len(reads)))
        except Exception as error:
            raise explain(error, model_name(model)) from error
        return table


def _decode(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    """Generated ids up to (not including) the first end-of-sequence token, and their text."""
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True), ids


def run(model, scope: Scope, target_model=None, remote: bool | str = False, progress: bool = True) -> pd.DataFrame:
    """Run the grid; one row per cell (see ``RESULT_COLUMNS``), in grid order.

    ``target_model``: patch into another model (cross-model; needs ``affine`` across
    hidden sizes). ``remote``: ``True`` for NDIF, ``"local"`` to test remote-safety; a
    remote grid is one request (an nnsight session) that returns only token ids and
    top-k probabilities."""
    from tqdm.auto import tqdm

    target_model = target_model or model
    the_plan = plan(scope, model, target_model)
    cells = the_plan.cells
    keys = sorted({(c.source, c.site, c.layer) for c in cells}, key=lambda k: (k[0].prompt, k[0].position, k[1], k[2]))
    vector_of = {k: i for i, k in enumerate(keys)}
    reads = [(src.prompt, src.position, site, layer) for src, site, layer in keys]
    read_passes = _read_passes(model.tokenizer, scope.prompts, reads, scope.batch_size)
    patch_passes, covered = _patch_passes(target_model, the_plan, vector_of)
    settings = {
        "output": scope.output, "max_new_tokens": scope.max_new_tokens, "top_k": scope.top_k,
        "do_sample": scope.do_sample, "temperature": scope.temperature, "mode": scope.mode,
        "pad_token_id": target_model.tokenizer.pad_token_id, "unembed": architecture_of(target_model).unembed,
        "weight": scope.affine_weight, "bias": scope.affine_bias, "directions": None,
    }  # fmt: skip
    if "random" in scope.transforms:
        generator = torch.Generator().manual_seed(scope.seed if scope.seed is not None else 0)
        settings["directions"] = torch.randn(len(keys), target_model.config.hidden_size, generator=generator)

    with torch.inference_mode():
        if remote:
            from superscopes.remote import configure

            configure()
            from superscopes.remote import explain

            try:
                # One request: the session runs every pass on the server and returns ids/probs.
                with model.session(remote=remote):
                    table = _execute_reads(model, read_passes, len(keys))
                    outputs = nnsight.save(_execute_patches(target_model, patch_passes, table, settings))
            except Exception as error:
                raise explain(error, model_name(model)) from error
        else:
            bar = tqdm(total=len(scope.prompts) + len(cells), desc="superscopes", unit="row", disable=not progress)
            table = _execute_reads(model, read_passes, len(keys), bar.update)
            check_amplified(table, scope.alphas, getattr(target_model, "dtype", torch.float32))
            outputs = _execute_patches(target_model, patch_passes, table, settings, bar.update)
            bar.close()

    per_cell: list[dict] = [{} for _ in cells]
    flat = iter(covered)
    for ids, probs in outputs:
        for row in range(len(ids)):
            i, row_ids = next(flat), ids[row].tolist()
            if scope.output == "generate":
                text, row_ids = _decode(target_model.tokenizer, row_ids)
                per_cell[i] = {"output": text, "output_ids": row_ids}
            else:
                per_cell[i] = {"output": target_model.tokenizer.decode([row_ids[0]]), "output_ids": row_ids,
                               "output_probs": probs[row].tolist()}  # fmt: skip
    return _frame(model, target_model, the_plan, per_cell)


def _frame(model, target_model, the_plan: _Plan, per_cell: list[dict]) -> pd.DataFrame:
    scope = the_plan.scope
    name, target_name = model_name(model), model_name(target_model)
    records = []
    for cell, out in zip(the_plan.cells, per_cell):
        src = cell.source
        record = {
            "model": name,
            "source": scope.prompts[src.prompt],
            "token": src.token,
            "position": src.position,
            "site": cell.site,
            "layer": cell.layer,
            "target": "source" if the_plan.target_text is None else the_plan.target_text,
            "target_layer": cell.target_layer,
            "target_site": scope.target_site,
            "target_position": src.position if the_plan.target_index is None else the_plan.target_index,
            "transform": cell.transform,
            "alpha": cell.alpha,
            "mode": scope.mode,
            "sample": cell.sample,
            **out,
        }
        if target_model is not model:
            record["target_model"] = target_name
        records.append(record)
    return pd.DataFrame.from_records(records)
