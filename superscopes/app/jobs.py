"""The explorer's jobs: a grid job (a grid cut into chunks, its rows and control rows) and a
panel job (a cell's or a latent's panel: one small result), their state as the page reads it,
their CSV, and ``Keeper``, which saves their snapshots in the run store."""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import pandas as pd

from superscopes.app.errors import log_error
from superscopes.app.store import RunStore, Snapshot

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs such a cell as a formula
# The keys of a job's state in the order the page and the store have always had them.
STATE_KEYS = (
    "job status ahead cancelling done total controls_done controls_total rate eta focus error model prompt settings "
    "grid rows next controls controls_next created elapsed kind request result"
).split()


def csv_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with text cells that a spreadsheet would run as a formula prefixed by ``'``."""

    def cell(value):
        return "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value

    text_columns = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    return frame.assign(**{c: frame[c].map(cell) for c in text_columns})


def csv_bytes(frames: list[pd.DataFrame]) -> bytes:
    """``frames`` (a grid's chunks) as one formula-safe CSV."""
    return csv_safe(pd.concat(frames, ignore_index=True)).to_csv(index=False).encode()


def finite(value):
    """``value``, or None for a float JSON cannot carry (NaN, infinity)."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def slug(text: str) -> str:
    """``text`` as a short file-name piece."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40] or "prompt"


@dataclass(eq=False)
class Job:
    """What every job has: who asked, its progress and its lifecycle (queued -> running ->
    done | cancelled | error). ``lock`` guards the fields the worker and requests share."""

    kind: ClassVar[str]
    id: str
    client: str
    model: str
    prompt: str
    total: int
    status: str = "queued"  # queued | running | done | cancelled | error
    done: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float = field(default_factory=time.time)
    running_since: float | None = None  # once the model is loaded: the rate counts compute only
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")

    def state(self, since: int = 0, ahead: int = 0, controls_since: int = 0) -> dict:
        """``ahead``: jobs that run before this queued one (the running one included)."""
        with self.lock:
            detail = self._detail(since, controls_since)
            now = self.finished or time.time()
            cells, planned = self.done + detail["controls_done"], self.total + detail["controls_total"]
            rate = eta = None
            if self.running_since is not None and cells and now > self.running_since:
                rate = cells / (now - self.running_since)  # measured cells per second
                eta = round((planned - cells) / rate, 1) if self.status == "running" else None
            state = detail | {
                "job": self.id,
                "status": self.status,
                "ahead": ahead,
                "cancelling": self.cancel.is_set() and self.active,
                "done": self.done,
                "total": self.total,
                "rate": None if rate is None else round(rate, 2),
                "eta": eta,
                "error": self.error,
                "model": self.model,
                "prompt": self.prompt,
                "created": self.created,
                "elapsed": round(now - self.started, 1),
                "kind": self.kind,
            }
            return {key: state[key] for key in STATE_KEYS}

    def _detail(self, since: int, controls_since: int) -> dict:
        """The state's keys of this kind of job (the caller holds ``lock``)."""
        raise NotImplementedError

    def summary(self) -> dict:
        """The history list's line for this run."""
        raise NotImplementedError

    def _line(self, best: float | None) -> dict:
        return {"model": self.model, "prompt": self.prompt, "done": self.done, "total": self.total, "best": best}

    def csv_later(self) -> Callable[[], bytes] | None:
        """The results so far as CSV, computed when called (None: this job has none)."""
        return None


@dataclass(eq=False)
class GridJob(Job):
    """A grid, cut into chunks of one source token and a few layers; then its controls."""

    kind: ClassVar[str] = "grid"
    grid: dict = field(default_factory=dict)  # what the page needs to lay out tables and heatmaps
    chunks: list[tuple[int, object]] = field(default_factory=list)  # (source position, sub-grid Scope), to run
    settings: dict = field(default_factory=dict)  # the form's fields, to restore it from a URL
    common: dict = field(default_factory=dict)  # Scope settings the control phase shares
    remote: bool = False
    focus: int | None = None  # the clicked token: its chunks run next
    controls_on: bool = False
    controls_total: int = 0  # control cells to run (reused ones not counted)
    controls_done: int = 0
    controls: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    frames: list[pd.DataFrame] = field(default_factory=list)

    def next_chunk(self):
        """The next chunk's Scope (the focused token's first), or None when none is left."""
        with self.lock:
            if not self.chunks:
                return None
            index = next((i for i, (p, _) in enumerate(self.chunks) if p == self.focus), 0)
            return self.chunks.pop(index)[1]

    def _detail(self, since: int, controls_since: int) -> dict:
        since = max(0, min(since, len(self.rows)))
        controls_since = max(0, min(controls_since, len(self.controls)))
        return {
            "controls_done": self.controls_done,
            "controls_total": self.controls_total,
            "focus": self.focus,
            "settings": self.settings,
            "grid": self.grid,
            "rows": self.rows[since:],
            "next": len(self.rows),
            "controls": self.controls[controls_since:],
            "controls_next": len(self.controls),
            "request": {},
            "result": None,
        }

    def summary(self) -> dict:
        with self.lock:
            scores = [r["similarity"] for r in self.rows if r["similarity"] is not None]
            return self._line(max(scores, default=None))

    def frame(self) -> pd.DataFrame:
        """The results so far, every chunk's rows in one table."""
        with self.lock:
            frames = list(self.frames)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def csv(self) -> bytes:
        """The results so far as CSV (formula-safe)."""
        return csv_safe(self.frame()).to_csv(index=False).encode()

    def csv_later(self) -> Callable[[], bytes] | None:
        with self.lock:
            frames = list(self.frames)  # the chunks so far: later ones belong to a later snapshot
        return (lambda: csv_bytes(frames)) if frames else None


@dataclass(eq=False)
class PanelJob(Job):
    """A small job beside the grids: a checked ``request`` and, once run, its ``result``."""

    request: dict = field(default_factory=dict)  # the checked request, as the page and the store read it
    result: dict | None = None

    def _detail(self, since: int, controls_since: int) -> dict:
        return {
            "controls_done": 0,
            "controls_total": 0,
            "focus": None,
            "settings": {},
            "grid": {},
            "rows": [],
            "next": 0,
            "controls": [],
            "controls_next": 0,
            "request": self.request,
            "result": self.result,
        }

    def summary(self) -> dict:
        """A panel job's line says its kind (the history lists grids only), and a finished
        latent job's its self-explanation."""
        with self.lock:
            explanation = (self.result or {}).get("explanation")
            return self._line(None) | {
                "kind": self.kind,
                "sae": self.request.get("sae"),
                "latent": self.request.get("latent"),
                "explanation": explanation,
            }


@dataclass(eq=False)
class CellJob(PanelJob):
    """A cell's panel: its SAE breakdown, generated and nearest-corpus inputs (``panels.py``)."""

    kind: ClassVar[str] = "cell"


@dataclass(eq=False)
class LatentJob(PanelJob):
    """A latent's panel: the SAE latent as the source, read out at a few alphas."""

    kind: ClassVar[str] = "latent"


class Keeper:
    """Saves jobs in the run store: their settings at the start, their rows after each chunk,
    everything when they stop. A failure is logged, never the job's."""

    def __init__(self, store: RunStore | None):
        self.store = store
        self.lock = threading.Lock()  # a save snapshots and writes at once: a later state always wins

    def __call__(self, job: Job, now: bool = False) -> None:
        """``now``: the worker tries to write at once; requests only hand the snapshot to the
        store's writer."""
        if self.store is None:
            return
        try:
            with self.lock:  # snapshots are taken in order: the store writes the newest last
                state = job.state() | {"ahead": 0, "cancelling": False, "eta": None}
                save = self.store.save_now if now else self.store.save_later
                save(job.id, Snapshot(job.created, state["status"], job.summary(), state, job.csv_later()))
        except Exception as error:  # a full disk must not fail the run
            log_error(error)
