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

Here the grid runs (``run``, ``Grid``, ``read_vectors``). Its specification and ``plan`` are in
``spec``; the client's side of its passes (batching, decoding through the readouts) in
``batching``; the passes themselves, which ship to NDIF, in ``graph``.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import nnsight
import torch

import superscopes.readouts.base as readout_base
from superscopes import graph
from superscopes.batching import _check_stats, _collect, _prepare, _read_passes, cell_seed
from superscopes.graph import _execute, _execute_reads, refuse_overflow
from superscopes.models import model_name
from superscopes.parsing import DEFAULT_THREADS
from superscopes.sites import ScopeError
from superscopes.spec import RESULT_COLUMNS, Cell, Plan, Scope, Source, Target, TargetLayer, _readouts, plan

if TYPE_CHECKING:  # pandas is imported where a frame is built: it adds ~0.3 s to `import superscopes`
    import pandas as pd

    from superscopes.models import Model

# Importable from here as before: spec (the grid's specification and plan) and batching split off.
__all__ = [
    "RESULT_COLUMNS",
    "Cell",
    "Grid",
    "Plan",
    "Scope",
    "ScopeError",
    "Source",
    "Target",
    "TargetLayer",
    "cell_seed",
    "plan",
    "read_vectors",
    "refuse_overflow",
    "run",
]


def read_vectors(
    model: Model,
    prompts: list[str],
    reads: list[tuple[int, int, str, int]],
    batch_size: int = 64,
    remote: bool | str = False,
) -> torch.Tensor:
    """Vectors ``[len(reads), d]`` for ``(prompt index, token index, site, layer)`` reads.

    Each prompt runs once, ``batch_size`` prompts per pass, and a pass saves its reads as
    one stacked tensor, so a remote run downloads only these vectors (in one request)."""
    passes = _read_passes(model.tokenizer, prompts, reads, batch_size)
    with torch.inference_mode():
        if not remote:
            return _execute_reads(model, passes, len(reads))[0]
        from superscopes import remote as ndif

        with ndif.request(model, remote, ship=(graph, readout_base), name=model_name(model)) as options:
            with model.session(**options):
                table = nnsight.save(_execute_reads(model, passes, len(reads))[0])
        return table


def _shipped(scope: Scope) -> tuple[ModuleType, ...]:
    """What a remote request sends by value besides ``ops`` and ``sites``: the graph's passes,
    the readout interface, and the module of each readout the grid runs in its passes."""
    used = {type(r).__module__ for r in _readouts(scope) if r.stage != "frame"} - {"__main__", readout_base.__name__}
    return (graph, readout_base, *(sys.modules[m] for m in sorted(used)))


def _run_cells(
    model: Model, target_model: Model, the_plan: Plan, chosen: list[int], remote: bool | str, timeout: float | None, bar
) -> list[dict]:
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

    def __init__(self, model: Model, scope: Scope, target_model: Model | None = None):
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

    def frame(self, outputs: tuple, remote: bool | str = False) -> pd.DataFrame:
        """The grid's frame (as ``superscopes.run`` returns it) from what ``run`` returned.
        ``remote``: where frame readouts that rerun passes (``relevancy``) run them."""
        if not (isinstance(outputs, tuple) and len(outputs) == 3):
            raise ScopeError("frame() takes what grid.run() returned inside the session (outputs = grid.run())")
        patched, read, stats = outputs
        _check_stats(stats, self._plan.scope, self._target_model)
        per_cell = _collect(self._model, self._target_model, self._prepared, patched, read)
        frame = _frame(self._model, self._target_model, self._plan, per_cell)
        return _annotated(self._model, self._target_model, self._plan, frame, remote)

    def __len__(self) -> int:
        return len(self._plan.cells)

    def __reduce__(self) -> tuple:
        # What a remote session sends: a graph.ShippedGrid with only what run() needs (the plan
        # holds the scope's callables and tensors, which the server has no use for), so this
        # module need not ship.
        return graph.ShippedGrid, (self._model, self._target_model, self._work)


def _fingerprint(model: Model, target_model: Model, the_plan: Plan) -> str:
    """A hash of everything that decides a grid's outputs (not how it is batched)."""
    scope = the_plan.scope
    digest = hashlib.sha256()
    targets = [[t.text, t.index] for t in the_plan.targets]
    settings = [
        model_name(model),
        model_name(target_model),
        scope.prompts,
        targets,
        scope.target_site,
        scope.mode,
        scope.output,
        scope.max_new_tokens,
        scope.top_k,
        scope.do_sample,
        scope.temperature,
        scope.seed,
        scope.logit_lens,
    ]
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
                'with superscopes.load(NAME, remote=True) (remote="local" runs a local model\'s request here)'
            )


def _tracing() -> bool:
    """Whether this thread is inside an nnsight session or trace body (or an invoke of one)."""
    from nnsight.tracing import tracer  # nnsight 0.8's per-thread nesting depth (read only)

    return getattr(tracer._local, "depth", 0) > 0


def run(
    model: Model,
    scope: Scope,
    target_model: Model | None = None,
    remote: bool | str = False,
    progress: bool = True,
    cells_per_request: int | None = None,
    checkpoint: str | Path | None = None,
    timeout: float | None = None,
    threads: int | None = DEFAULT_THREADS,
) -> pd.DataFrame:
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
        frame = _frame(model, target_model, the_plan, per_cell)
        return _annotated(model, target_model, the_plan, frame, remote)
    finally:
        torch.set_num_threads(previous)
        bar.close()


def _annotated(model: Model, target_model: Model, the_plan: Plan, frame: pd.DataFrame, remote) -> pd.DataFrame:
    """``frame`` with the columns of the plan's frame readouts (``Readout.annotate``: the judge,
    teacher-forced reruns), computed after the grid and never checkpointed."""
    scope, found = the_plan.scope, {}

    def vectors() -> torch.Tensor:  # each row's source vector, read again (once) only if asked for
        if "table" not in found:
            prompt_of = {prompt: i for i, prompt in reversed(list(enumerate(scope.prompts)))}
            if scope.vectors is not None:
                found["table"] = scope.vectors[[prompt_of[s] for s in frame["source"]]].detach().float().cpu()
            else:
                keys = [(prompt_of[r.source], r.position, r.site, r.layer) for r in frame.itertuples(index=False)]
                found["table"] = read_vectors(model, list(scope.prompts), keys, remote=remote)
        return found["table"]

    for readout in the_plan.readouts:
        if readout.stage == "frame":
            frame = frame.assign(**readout.annotate(model, target_model, scope, frame, remote, vectors))
    return frame


def _frame(model: Model, target_model: Model, the_plan: Plan, per_cell: list[dict]) -> pd.DataFrame:
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
