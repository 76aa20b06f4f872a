"""The graph's passes as they run inside a session: on this machine, or shipped to NDIF.

Everything here is trace code and plain torch, and the whole module ships by value with a
remote request (``remote.send_by_value``): NDIF compiles each function from its source and
imports only the modules on its allowlist, so this module imports nothing else but the other
shipped modules (``ops``, ``sites``, ``readouts``; ``tests/test_shipped.py`` checks it). The
client plans the passes (``superscopes.batching``) as plain tensors in a ``_Work``;
``_execute`` runs them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nnsight
import torch

from superscopes import ops
from superscopes.readouts.base import Context, Readout
from superscopes.sites import ScopeError, hidden_size, num_layers


@dataclass(frozen=True)
class Settings:
    """What the patch passes need besides their own plan, one per request (built by the client)."""

    readouts: tuple[Readout, ...]  # the primary one (Scope.output) first
    generate: bool  # patch passes are model.generate (else one forward each)
    max_new_tokens: int
    top_k: int
    temperature: float
    mode: str  # ops.WRITE_MODES
    pad_token_id: int | None
    maps: tuple[tuple[torch.Tensor | None, torch.Tensor | None], ...]  # affine (weight, bias) by map index
    directions: torch.Tensor | None = None  # the random control's direction per vector
    latent: dict[str, torch.Tensor] | None = None  # the latent transform's SAE parameters
    intervene: Callable | None = None  # the user's own edit, in every forward pass


# A pass is planned on the client (tokenisation, rows, columns) as plain tensors, so that
# executing it is only nnsight traces and torch: the part that runs on NDIF.


@dataclass
class _Group:
    site: str
    layer: int
    rows: torch.Tensor  # batch rows
    columns: torch.Tensor  # token columns in the pass's input (padded batch, or the unshared suffix)
    vectors: torch.Tensor  # read pass: where the values go in the vector table; patch pass: which vectors
    maps: list[tuple[int, torch.Tensor]] | None = None  # affine per layer pair: (map index, group members)


@dataclass
class _Pass:
    """One batched forward (read) or ``generate``/``trace`` (patch).

    Unshared passes feed ``texts`` (left-padded). Shared-prefix passes feed one text's
    ``ids`` ``[1, T]`` to every row: its first ``start`` tokens are the same in every row, so
    they run once (``prefix``: an index into the plan's prefix table, whose KV cache every
    row reuses) and only tokens ``start..T-1`` run per row."""

    groups: list[_Group]
    texts: list[str] | None = None
    ids: torch.Tensor | None = None
    start: int = 0
    prefix: int | None = None
    alphas: torch.Tensor | None = None  # patch passes: one per batch row
    transform: str = "scale"
    seeds: torch.Tensor | None = None  # sampled patch passes: one seed per row (per cell)
    width: int = 0  # unshared patch passes: tokens of the padded input, which generate returns first


def _intervene(model, tracer, intervene: Callable, steps: int | None, found: dict) -> None:
    """Inside an invoke of its own (so its module accesses need not interleave with the
    grid's): the user's ``intervene`` once, or at each of ``steps`` generation steps; what it
    returns at the first is kept in ``found`` (filled in place: a loop cut short by an early
    end of generation does not return)."""
    if steps is None:
        found["values"] = intervene(model)
        return
    for step in tracer.iter[:steps]:
        values = intervene(model)
        if step == 0:
            found["values"] = values


def _execute_reads(
    model, passes: list[_Pass], n_vectors: int, settings: Settings | None = None
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, ...]]]:
    """Run read passes; returns the vector table ``[n_vectors, d]`` and what each read-stage
    readout of ``settings`` computed, by name (tensors with one row per vector). Only traces
    and torch. A pass stops after its last read (the layers above it never run), unless the
    user's ``intervene`` runs in it too (it may reach any layer)."""
    table = torch.empty(n_vectors, hidden_size(model))
    readouts = [r for r in settings.readouts if r.stage == "read"] if settings is not None else []
    intervene = settings.intervene if settings is not None else None
    top_k = settings.top_k if settings is not None else 0
    tables: dict[str, tuple[torch.Tensor, ...]] = {}
    for p in passes:
        computed = {}
        with model.trace() as tracer:
            if intervene is not None:  # first: at a module both touch, the read sees its edit
                with tracer.invoke():
                    _intervene(model, tracer, intervene, None, {})
            with tracer.invoke(p.texts):
                values = [ops.read(model, g.site, g.layer, g.columns, g.rows) for g in p.groups]
                stacked = torch.cat(values).save()
                for readout in readouts:
                    context = Context(top_k, vectors=stacked)
                    computed[readout.name] = nnsight.save(readout.compute(model, tracer, context))
                if intervene is None:
                    tracer.stop()
        where = torch.cat([g.vectors for g in p.groups])
        table[where] = stacked.to(table.dtype).cpu()
        for name, found in computed.items():
            if name not in tables:
                tables[name] = tuple(torch.empty(n_vectors, *t.shape[1:], dtype=t.dtype) for t in found)
            for whole, part in zip(tables[name], found):
                whole[where] = part.cpu()
    return table, tables


def _prefix_caches(model, prefixes: list[torch.Tensor], intervene: Callable | None = None) -> list[tuple[str, object]]:
    """The KV cache of each shared prefix (one row each), computed once per run, with the name
    the model's forward takes it by: ``cache`` from transformers 5.24 on, ``past_key_values``
    before (a server may run another transformers than the client)."""
    caches = []
    for ids in prefixes:
        with model.trace(use_cache=True, logits_to_keep=1) as tracer:
            if intervene is not None:
                with tracer.invoke():
                    _intervene(model, tracer, intervene, None, {})
            with tracer.invoke(ids):
                output = model.output
                name = "cache" if "cache" in output else "past_key_values"
                found = nnsight.save((name, output[name]))
        caches.append(found)
    return caches


def _apply_patches(target_model, p: _Pass, table: torch.Tensor, settings: Settings) -> None:
    """Inside a trace: write each group's transformed vectors, in forward order."""
    spec = ops.TRANSFORM_TABLE[p.transform]
    if not spec.writes:
        return
    for g in p.groups:
        parts = [(None, slice(None))] if g.maps is None else g.maps
        for map_index, members in parts:  # rows of one group that share an affine map
            rows, vectors = g.rows[members], g.vectors[members]
            extra = {}
            if spec.argument == "weight":
                weight, bias = settings.maps[map_index or 0]
                extra = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
            elif spec.argument == "direction":
                extra = {"direction": settings.directions[vectors]}
            elif spec.argument == "latent":
                extra = {"latent": settings.latent}
            ops.patch(
                target_model,
                g.site,
                g.layer,
                table[vectors],
                g.columns[members],
                rows,
                alpha=p.alphas[rows],
                transform=p.transform,
                mode=settings.mode,
                **extra,
            )


def _read_stats(table: torch.Tensor, settings: Settings) -> dict:
    """What the client checks after the passes it did not watch: the read vectors' largest entry
    and norm (``refuse_overflow``) and whether the latent transform's latent is silent. Plain
    torch, runs remotely too."""
    if not len(table):
        return {"entry": 0.0, "norm": 0.0, "silent": False}
    return {
        "entry": float(table.abs().max()),
        "norm": float(table.double().norm(dim=-1).max()),
        "silent": _latent_silent(table, settings),
    }


def _latent_silent(table: torch.Tensor, settings: Settings) -> bool:
    """Whether the ``latent`` transform's latent is zero on every source vector (then every
    alpha writes the same vector); False without that transform. Plain torch, runs remotely too."""
    if settings.latent is None or not len(table):
        return False
    encoder = {name: value for name, value in settings.latent.items() if name != "decoder_row"}
    return bool((ops.latent_activation(table.float(), **encoder) == 0).all())


def _pass_inputs(model, p: _Pass, caches: list[tuple[str, object]], settings: Settings) -> tuple:
    """What a patch pass feeds the model: texts, or token ids plus the shared prefix's cache
    (with room for the tokens a ``generate`` pass adds to it)."""
    if p.ids is None:
        return p.texts, {}
    n = len(p.alphas)
    extra = {}
    if p.prefix is not None:
        name, cache = caches[p.prefix]
        # generate feeds tokens start..T-1, then each new token but the last
        room = p.ids.shape[1] - p.start + settings.max_new_tokens - 1 if settings.generate else 0
        extra = {name: ops.repeat_cache(model, cache, n, room)}
    # The mask covers the cached tokens too (nnsight would otherwise build one for the fed
    # tokens only, hiding the prefix); generate skips the tokens its cache already holds.
    mask = torch.ones(n, p.ids.shape[1], dtype=torch.long)
    fed = p.ids if settings.generate else p.ids[:, p.start :]
    return {"input_ids": fed.repeat(n, 1), "attention_mask": mask}, extra


def _execute_patches(
    target_model,
    passes: list[_Pass],
    prefixes: list[torch.Tensor],
    table: torch.Tensor,
    settings: Settings,
    on_pass: Callable[[int], object] | None = None,
) -> list[tuple[dict[str, tuple[torch.Tensor, ...]], object]]:
    """Run patch passes; returns per pass what each patch-stage readout computed, by name, and
    what the user's ``intervene`` returned in the pass's first forward (or None)."""
    outputs = []
    intervene = settings.intervene
    primary, *rest = [r for r in settings.readouts if r.stage == "patch"]
    caches = _prefix_caches(target_model, prefixes, intervene)
    for p in passes:
        inputs, extra = _pass_inputs(target_model, p, caches, settings)
        found, computed = {}, {}
        if settings.generate:
            kwargs = {
                "max_new_tokens": settings.max_new_tokens,
                "do_sample": False,
                "pad_token_id": settings.pad_token_id,
            }
            if p.seeds is not None:  # sampling as greedy decoding of Gumbel-perturbed logits, seeded per cell
                kwargs["logits_processor"] = [ops.CellSampler(p.seeds, settings.temperature)]
            context = _patch_context(p, table, settings, fed=p.width if p.ids is None else p.ids.shape[1])
            with target_model.generate(**kwargs, **extra) as tracer:
                if intervene is not None:  # every generated token's forward, not only the prompt's
                    with tracer.invoke():
                        _intervene(target_model, tracer, intervene, settings.max_new_tokens, found)
                with tracer.invoke(inputs):
                    _apply_patches(target_model, p, table, settings)
                    computed[primary.name] = nnsight.save(primary.compute(target_model, tracer, context))
                _readouts_after(target_model, tracer, rest, context, computed)
        else:
            context = _patch_context(p, table, settings)
            with target_model.trace(logits_to_keep=1, **extra) as tracer:
                if intervene is not None:
                    with tracer.invoke():
                        _intervene(target_model, tracer, intervene, None, found)
                with tracer.invoke(inputs):
                    _apply_patches(target_model, p, table, settings)
                    computed[primary.name] = nnsight.save(primary.compute(target_model, tracer, context))
                _readouts_after(target_model, tracer, rest, context, computed)
        outputs.append((computed, found.get("values")))
        if on_pass is not None:
            on_pass(len(p.alphas))
    return outputs


def _patch_context(p: _Pass, table: torch.Tensor, settings: Settings, fed: int = 0) -> Context:
    """What a patch pass's readouts are given: per batch row, the token column its vector is
    written at and that (source) vector, before any transform."""
    positions = torch.zeros(len(p.alphas), dtype=torch.long)
    vectors = torch.zeros(len(p.alphas), table.shape[-1])
    for g in p.groups:
        positions[g.rows] = g.columns
        vectors[g.rows] = table[g.vectors].to(vectors.dtype)
    return Context(settings.top_k, fed=fed, vectors=vectors, positions=positions)


def _readouts_after(model, tracer, readouts: list[Readout], context: Context, computed: dict) -> None:
    """Inside a patch pass, after the patched rows' own invoke: each other readout in an invoke
    of its own over the whole batch (it sees the writes; its module accesses need not follow
    the primary readout's in forward order)."""
    for readout in readouts:
        with tracer.invoke():
            computed[readout.name] = nnsight.save(readout.compute(model, tracer, context))


def teacher_forced_passes(model, rows: list[tuple]) -> list[tuple]:
    """The teacher-forced reruns of ``batching.teacher_forced``: per row ``(ids [1, T], prompt
    length, vector [1, d], (site, layer, position, alpha, transform, mode))``, the tokens after
    the prompt's probabilities patched and clean, the patched log-distribution of the first
    one, and the last block's output at the patched position."""
    last = num_layers(model) - 1
    out = []
    for ids, n_prompt, vector, (site, layer, position, alpha, transform, mode) in rows:
        picked = ids[0, n_prompt:]
        found = {}
        for patched in (True, False):
            with model.trace(ids):
                if patched:
                    ops.patch(
                        model, site, layer, vector, position=position, alpha=alpha, transform=transform, mode=mode
                    )
                    found["final"] = ops.read(model, "resid_post", last, position=position).save()
                # The predictions of every generated token, and one more: the first row is
                # there even when generation stopped at once (no output tokens).
                found[patched] = model.output.logits[0, n_prompt - 1 :].float().log_softmax(-1).save()
        probs = {
            p: found[p][:-1].exp().gather(-1, picked[:, None].to(found[p].device))[:, 0].cpu() for p in (True, False)
        }
        out.append((probs[True], probs[False], found[True][0].cpu(), found["final"][0].float().cpu()))
    return out


@dataclass
class _Work:
    """One request's passes, planned on the client. ``_execute`` runs them with traces and
    torch only: the part that runs inside a session, and on NDIF."""

    read_passes: list[_Pass]
    n_vectors: int
    external: torch.Tensor | None  # the scope's own vectors instead of read ones
    patch_passes: list[_Pass]
    prefixes: list[torch.Tensor]
    settings: Settings


def _execute(model, target_model, work: _Work, on_pass=None, check_alphas: Sequence[float] = ()) -> tuple:
    """Run a request's reads and patch passes: ``(outputs per patch pass, read-stage readouts
    by name, the read vectors' statistics: ``_read_stats``)``. Only traces and torch (this is
    what a session, local or remote, runs)."""
    if work.external is not None:
        table, read = work.external, {}
    else:
        table, read = _execute_reads(model, work.read_passes, work.n_vectors, work.settings)
    stats = _read_stats(table, work.settings)
    if check_alphas:  # locally, refused before any patched pass (remote: after, by _check_stats)
        refuse_overflow(stats["entry"], stats["norm"], check_alphas, getattr(target_model, "dtype", torch.float32))
    return _execute_patches(target_model, work.patch_passes, work.prefixes, table, work.settings, on_pass), read, stats


def unembed_vectors(
    model, vectors: torch.Tensor, anchor: str, top_k: int, full: bool, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The final norm and unembedding of ``vectors [n, d]``, ``batch_size`` rows per trace of
    the one-token prompt ``anchor``: top-``top_k`` ids and probabilities, and with ``full``
    every log-probability (``lens.decode``; inside a session, all chunks are one request)."""
    ids, probs, logprobs = [], [], []
    for start in range(0, len(vectors), batch_size):
        chunk = vectors[start : start + batch_size].float()
        with model.trace(anchor):
            lp = ops.unembed(model, chunk).log_softmax(-1)
            top = lp.topk(top_k)
            top_ids, top_probs = top.indices.save(), top.values.exp().save()
            if full:
                full_lp = lp.save()
        ids.append(top_ids.cpu())
        probs.append(top_probs.cpu())
        if full:
            logprobs.append(full_lp.cpu())
    return (
        torch.cat(ids) if ids else torch.empty(0, top_k, dtype=torch.long),
        torch.cat(probs) if probs else torch.empty(0, top_k),
        (torch.cat(logprobs) if logprobs else torch.empty(0, 0)) if full else None,
    )


def refuse_overflow(entry: float, norm: float, alphas: Sequence[float], dtype: torch.dtype) -> None:
    """Refuse alphas whose product with the read vectors (largest entry ``entry``, largest norm
    ``norm``) overflows ``dtype``, or whose squared norm overflows float32, where RMS/LayerNorm
    sum the squares: the norm is then 0, the patched position reads as zeros and every readout
    is the uniform one. Checked after the read pass: locally before any patched pass; for a run
    the client cannot watch (on NDIF, or a ``Grid`` in a session) before any cell is reported."""
    if not alphas:
        return
    alpha = max(alphas, key=abs)
    if not entry * abs(alpha) < torch.finfo(dtype).max:
        raise ScopeError(
            f"alpha {alpha} times the read vectors (largest entry {entry:.3g}) "
            f"overflows {dtype} (largest value {torch.finfo(dtype).max:.3g}); use smaller alphas"
        )
    limit = math.sqrt(torch.finfo(torch.float32).max)
    if not norm * abs(alpha) < limit:
        raise ScopeError(
            f"alpha {alpha} times the read vectors (largest norm {norm:.3g}) has a squared norm over float32's "
            f"largest value, so the model's normalisation overflows and every readout would be uniform; "
            f"use alphas below {limit / norm:.3g}"
        )


class ShippedGrid:
    """What a ``superscopes.Grid`` becomes when a remote session sends it: only its passes."""

    def __init__(self, model, target_model, work: _Work) -> None:
        self._model, self._target_model, self._work = model, target_model, work

    def run(self) -> tuple:
        """The grid's reads and patch passes, run where the session runs (see ``Grid.run``)."""
        return nnsight.save(_execute(self._model, self._target_model, self._work))
