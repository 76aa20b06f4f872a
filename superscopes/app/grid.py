"""Grid jobs: a checked grid request planned against its model and cut into chunks, and the
runner that runs them, then the controls of each best readout.

A chunk is one ``superscopes.run`` call on a sub-grid (one source token x a few layers, every
site and alpha), followed by the judge. Between chunks the job publishes its rows and checks
for cancellation; the chunks of the token the page has clicked run next. The second phase runs
the controls of each best readout (alpha 1, norm-matched, random direction of the same norm).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import pandas as pd

from superscopes.app.errors import error_text, log_error
from superscopes.app.jobs import GridJob, Keeper, finite
from superscopes.app.model_cache import REMOTE_PREFIX, ModelCache, WithTokenizer
from superscopes.app.request import (
    CONTROLS,
    DEFAULTS,
    ROW_COLUMNS,
    GridRequest,
    grid_cells,
    grid_layers,
    reused_controls,
)

if TYPE_CHECKING:
    from superscopes.models import Model


def readout_columns(names: list[str]) -> list[str]:
    """The frame columns the chosen readouts add, which the page's rows carry too."""
    from superscopes import readouts

    return [column for name in names for column in readouts.REGISTRY[name].columns]


CONTROL_OF = {transform: name for name, (transform, _) in CONTROLS.items()}


def best_rows(rows: list[dict]) -> dict[tuple, dict]:
    """The best judged row of each (position, site, layer): highest similarity, an echo only
    where every row echoes, ties to the smaller alpha (as ``superscopes.judge.best``)."""
    best: dict[tuple, dict] = {}
    for row in sorted(rows, key=lambda r: r["alpha"]):
        key = (row["position"], row["site"], row["layer"])
        if row["similarity"] is None:
            continue
        rank = (not row.get("echo"), row["similarity"])
        if key not in best or rank > (not best[key].get("echo"), best[key]["similarity"]):
            best[key] = row
    return best


# ---------------------------------------------------------------- planning


def grid_job(
    request: GridRequest,
    model: Model,
    models: ModelCache,
    limits: dict,
    chunk_rows: int,
    batch_size: int,
    threshold: float,
) -> GridJob:
    """Check the grid against the model, validate it with the core's ``plan`` (no forward
    pass) and cut it into chunks. Takes no lock that a running job holds."""
    from superscopes.models import model_name
    from superscopes.sites import num_layers

    layers, target_layer = grid_layers(request, num_layers(model), model_name(model))
    pieces = models.tokens(model, request.prompt)  # at most max_prompt_chars characters
    n_cells, n_controls = grid_cells(request, pieces, len(layers), limits)
    common = {
        "sites": request.sites,
        "alphas": request.alphas,
        "transforms": [request.transform],
        "target": request.target,
        "placeholder": request.placeholder,
        "target_layers": [target_layer],
        "max_new_tokens": request.max_new_tokens,
        "batch_size": batch_size,
        "readouts": request.readouts,
    }
    positions, target, target_token = _sources(request, model, models, layers, common, pieces)
    grid = {
        "tokens": pieces,
        "positions": positions,
        "sites": request.sites,
        "layers": layers,
        "alphas": request.alphas,
        "transform": request.transform,
        "target_layer": target_layer,
        "target": target,
        "target_token": target_token,
        "threshold": threshold,
    }
    return GridJob(
        id=uuid.uuid4().hex[:12],
        client=request.client,
        model=request.model,
        prompt=request.prompt,
        total=n_cells,
        grid=grid,
        chunks=grid_chunks(request.prompt, positions, layers, common, chunk_rows),
        settings=_settings(request, target_layer),
        common=common,
        controls_on=request.controls,
        controls_total=n_controls,
        focus=request.focus,
        remote=request.model.startswith(REMOTE_PREFIX),
    )


def _sources(
    request: GridRequest, model: Model, models: ModelCache, layers: list[int], common: dict, pieces: list[dict]
) -> tuple[list[int], str, str]:
    """The source positions the grid reads (``plan`` raises ScopeError for a grid it refuses),
    the target prompt and the target token its vectors replace."""
    from superscopes import Scope
    from superscopes.prompts import tokens
    from superscopes.scope import plan

    where = {"all": {"all_tokens": True}, "last": {"position": -1}, "match": {"token": request.token}}
    full = Scope(request.prompt, layers=layers, **where[request.tokens], **common)
    full.max_cells = 10**9  # bounded above; this page's cap counts only the tokens it runs
    with models.tokenizer(model) as tokenizer:  # plan tokenises: give it the private tokenizer, not the worker's
        the_plan = plan(WithTokenizer(model, tokenizer), full)
        patched = the_plan.targets[0]
        target_token = tokens(tokenizer, patched.text)[patched.index]
    positions = [s.position for s in the_plan.sources]
    if request.tokens == "all":
        positions = [p for p in positions if not pieces[p]["special"]]
    return positions, patched.text, target_token


def grid_chunks(prompt: str, positions: list[int], layers: list[int], common: dict, chunk_rows: int) -> list[tuple]:
    """A few layers of one source token, every site and alpha; layer groups outermost so
    that every token fills in from its first layers on."""
    from superscopes import Scope

    step = max(1, chunk_rows // (len(common["sites"]) * len(common["alphas"])))
    return [
        (p, Scope(prompt, position=p, layers=layers[i : i + step], **common))
        for i in range(0, len(layers), step)
        for p in positions
    ]


def _settings(request: GridRequest, target_layer: int | str) -> dict:
    """The form's fields, to restore it from the run's URL."""
    layers = request.layers
    return {
        "model": request.model,
        "prompt": request.prompt,
        "tokens": request.tokens,
        "token": request.token,
        "layers": layers if isinstance(layers, str) else ",".join(map(str, layers)),
        "target_layer": target_layer,
        "sites": request.sites,
        "alphas": ",".join(f"{a:g}" for a in request.alphas),
        "transform": request.transform,
        "target": request.target_kind,
        "template": request.target if request.target_kind == "custom" else "",
        "placeholder": request.placeholder or DEFAULTS["placeholder"],
        "max_new_tokens": request.max_new_tokens,
        "controls": request.controls,
        "readouts": request.readouts,
    }


def control_cells(rows: list[dict], transform: str, alphas: list[float]) -> tuple[dict[int, set], list[dict]]:
    """The control cells to run for each best readout, by source position, and the control
    rows copied from the grid (those it already holds)."""
    reused = reused_controls(transform, alphas)
    by_cell = {(r["position"], r["site"], r["layer"], r["alpha"]): r for r in rows}
    wanted: dict[int, set] = {}
    copies = []
    for (position, site, layer), row in best_rows(rows).items():
        for name, (control, alpha) in CONTROLS.items():
            alpha = row["alpha"] if alpha is None else alpha
            if name in reused:
                copies.append(by_cell[(position, site, layer, alpha)] | {"control": name})
            else:
                wanted.setdefault(position, set()).add((site, layer, control, alpha))
    return wanted, copies


def control_chunks(job: GridJob, wanted: dict[int, set], step: int) -> list[tuple]:
    """Sub-grids of one source token and a few layers; a ``where`` filter keeps only the
    controls' cells of the sites, alphas and transforms they span."""
    from superscopes import Scope

    chunks = []
    for position, cells in wanted.items():
        layers = sorted({layer for _, layer, _, _ in cells})
        common = job.common | {
            "alphas": sorted({a for *_, a in cells}),
            "transforms": sorted({t for _, _, t, _ in cells}),
        }
        keep = frozenset(cells)
        for i in range(0, len(layers), step):
            scope = Scope(
                job.prompt,
                position=position,
                layers=layers[i : i + step],
                **common,
                where=lambda c, keep=keep: (c.site, c.layer, c.transform, c.alpha) in keep,
            )
            chunks.append((position, scope))
    return chunks


# ---------------------------------------------------------------- running


class GridRunner:
    """Runs a grid job on the worker thread: its chunks, then its controls, publishing rows
    and keeping the job after each chunk. ``score``: ``frame -> frame with a similarity column``."""

    def __init__(
        self, models: ModelCache, score: Callable[[pd.DataFrame], pd.DataFrame], keep: Keeper, chunk_rows: int
    ):
        self.models, self.score, self.keep, self.chunk_rows = models, score, keep, chunk_rows

    def run(self, job: GridJob, between_chunks: Callable[[], None]) -> None:
        """``between_chunks``: what else the worker runs between two chunks (the panel jobs)."""
        try:
            model = self.models.model(job.model)
            if job.remote:  # the page shows progress; keep nnsight's per-request spinner off the terminal
                from nnsight import CONFIG

                CONFIG.APP.REMOTE_LOGGING = False
            with job.lock:
                job.running_since = time.time()
            self._chunks(job, model, between_chunks)
            if job.controls_on and not job.cancel.is_set():
                self._controls(job, model, between_chunks)
            with job.lock:
                complete = job.done == job.total and job.controls_done == job.controls_total
            status, error = ("done" if complete else "cancelled"), None
        except Exception as exc:  # reported to the page; the traceback goes to the terminal
            log_error(exc)
            status, error = "error", error_text(exc)
        with job.lock:
            job.status, job.error, job.finished = status, error, time.time()
        self.keep(job, now=True)

    def _chunks(self, job: GridJob, model: Model, between_chunks: Callable[[], None], control: bool = False) -> None:
        """Run the job's chunks in turn (the focused token's first), publishing each one's rows:
        grid rows, or control rows (``control``) named by their transform."""
        import superscopes
        from superscopes.judge import flag_echoes

        while not job.cancel.is_set() and (chunk := job.next_chunk()) is not None:
            between_chunks()  # a clicked cell's panel need not wait for the whole grid
            frame = self.score(superscopes.run(model, chunk, remote=job.remote, progress=False, threads=None))
            frame["model"] = job.model
            frame = flag_echoes(frame, target=job.grid["target"])  # the one echo rule (judge.score's)
            frame["control"] = frame["transform"].map(CONTROL_OF) if control else ""
            columns = [
                *ROW_COLUMNS,
                *readout_columns(job.common.get("readouts", [])),
                *(["control"] if control else []),
            ]
            rows = [
                {k: finite(v.item() if hasattr(v, "item") else v) for k, v in zip(columns, values)}
                for values in frame[columns].itertuples(index=False)
            ]
            with job.lock:
                job.frames.append(frame)
                if control:
                    job.controls.extend(rows)
                    job.controls_done += len(rows)
                else:
                    job.rows.extend(rows)
                    job.done += len(rows)
            self.keep(job)  # a finished chunk outlives a crash of this process

    def _controls(self, job: GridJob, model: Model, between_chunks: Callable[[], None]) -> None:
        """The second phase: each best readout's controls; those the grid holds are copied,
        not run again."""
        with job.lock:
            rows = list(job.rows)
        transform, alphas = job.grid["transform"], job.grid["alphas"]
        wanted, copies = control_cells(rows, transform, alphas)
        per_cell = len(job.grid["sites"]) * (len(CONTROLS) - len(reused_controls(transform, alphas)))
        chunks = control_chunks(job, wanted, step=max(1, self.chunk_rows // max(per_cell, 1)))
        with job.lock:
            job.controls.extend(copies)
            job.controls_total = sum(len(cells) for cells in wanted.values())  # rows without a score have none
            job.chunks = chunks
        self._chunks(job, model, between_chunks, control=True)
