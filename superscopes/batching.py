"""The client's side of the grid's passes: a plan's cells as batched passes of plain tensors
(tokenised, grouped, padded: ``graph`` runs them) and what the passes return as columns of
the cells, through their readouts."""

from __future__ import annotations

import collections
import itertools
import warnings
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from superscopes.graph import Settings, _Group, _Pass, _Work, refuse_overflow, teacher_forced_passes
from superscopes.prompts import num_tokens
from superscopes.readouts.base import REGISTRY
from superscopes.sites import SITE_NAMES, ScopeError, hidden_size
from superscopes.spec import RESULT_COLUMNS, Cell, Plan, Scope, Source

if TYPE_CHECKING:
    from superscopes.models import Model


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
            groups.append(
                _Group(reads[members[0]][2], reads[members[0]][3], torch.tensor(rows), columns, torch.tensor(members))
            )
        passes.append(_Pass(groups, texts=texts))
    return passes


def cell_seed(seed: int, cell: Cell) -> int:
    """A sampled cell's own seed: a stable hash of what the cell is, so its text does not
    depend on the batch size, the chunking or the other cells of the grid."""
    src = cell.source
    key = f"{seed}|{src.prompt}|{src.position}|{cell.site}|{cell.layer}|{cell.transform}|{cell.alpha!r}|"
    return zlib.crc32(f"{key}{cell.target_layer}|{cell.sample}".encode())


def _patch_passes(
    target_model: Model, the_plan: Plan, vector_of: dict, map_of: dict | None
) -> tuple[list[_Pass], list[int], list[torch.Tensor]]:
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
                groups.append(
                    _Group(
                        scope.target_site,
                        chunk_cells[g[0]].target_layer,
                        torch.tensor(g),
                        columns[g],
                        vector_ids[g],
                        maps,
                    )
                )
            seeds = None
            if scope.do_sample:
                seeds = torch.tensor([cell_seed(scope.seed or 0, c) for c in chunk_cells], dtype=torch.int64)
            alphas = torch.tensor([c.alpha for c in chunk_cells])
            passes.append(_Pass(groups, alphas=alphas, transform=chunk_cells[0].transform, seeds=seeds, **inputs))
            covered += chunk
    return passes, covered, prefixes


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


def _prepare(model: Model, target_model: Model, the_plan: Plan, chosen: list[int]) -> _Prepared:
    """Plan the passes that read, patch and decode the cells ``chosen`` (indices into the plan)."""
    scope = the_plan.scope
    sub = Plan(scope, the_plan.sources, [the_plan.cells[i] for i in chosen], the_plan.targets, the_plan.readouts)
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
    chosen_readouts = tuple(r for r in the_plan.readouts if r.stage != "frame")  # frame readouts never ship
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


def _check_stats(stats: dict, scope: Scope, target_model: Model) -> None:
    """Client side, before any cell is reported: refuse overflowing alphas, warn about a silent latent."""
    refuse_overflow(stats["entry"], stats["norm"], scope.alphas, getattr(target_model, "dtype", torch.float32))
    if stats["silent"]:
        _warn_latent_silent(scope)


def _warn_latent_silent(scope: Scope) -> None:
    sae, latent = scope.sae_latent
    warnings.warn(
        f"transform 'latent': latent {latent} of {sae!r} is zero on every read vector of this grid, so "
        "its alphas change nothing (pick a latent active there: sae.decompose(vector))",
        stacklevel=5,
    )


def _collect(model: Model, target_model: Model, prepared: _Prepared, outputs: list, read: dict) -> list[dict]:
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
            decoded = {}  # each vector once: a grid patches one vector into many cells
            for i, cell in enumerate(cells):
                vector = prepared.vector_of[(cell.source, cell.site, cell.layer)]
                if vector not in decoded:
                    decoded[vector] = readout.decode(model.tokenizer, read[readout.name], vector)
                per_cell[i].update(decoded[vector])
    return per_cell


def _own_columns() -> set[str]:
    """The frame's own columns: the grid's, and every registered readout's."""
    return {*RESULT_COLUMNS, "target_model", *(c for r in REGISTRY.values() for c in r.columns)}


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


def teacher_forced(model: Model, frame, vectors: list[torch.Tensor], remote: bool | str = False) -> list[tuple]:
    """Per row of a generated grid's ``frame``, its target prompt and generated tokens rerun in
    ``model`` teacher-forced, once with the row's patch of ``vectors[i]`` and once clean:
    ``(patched probabilities of the generated tokens, clean ones, the patched log-distribution
    of the first generated token, the last block's output at the patched position)``; one
    request when remote. The ``relevancy`` readout and ``sae.explanation_scores`` read these."""
    rows = []
    for row, vector in zip(frame.itertuples(index=False), vectors):
        target = row.source if row.target == "source" else row.target
        prompt = model.tokenizer(target)["input_ids"]
        ids = torch.tensor([prompt + list(row.output_ids)])
        patch = (row.target_site, row.target_layer, row.target_position, row.alpha, row.transform, row.mode)
        rows.append((ids, len(prompt), vector.float()[None], patch))
    with torch.inference_mode():
        if not remote:
            return teacher_forced_passes(model, rows)
        import nnsight

        import superscopes.readouts.base as readout_base
        from superscopes import graph
        from superscopes import remote as ndif
        from superscopes.models import model_name

        with ndif.request(model, remote, ship=(graph, readout_base), name=model_name(model)) as options:
            with model.session(**options):
                scores = nnsight.save(teacher_forced_passes(model, rows))
        return scores
