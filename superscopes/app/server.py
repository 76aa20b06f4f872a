"""The Superscopes web app: a JSON API on the standard library's ``ThreadingHTTPServer``.

The page (``static/``) sends a grid; the request path parses and bounds every field (pure
functions below), validates the grid with the core's ``plan`` (no forward pass) and queues it.
One worker thread (the model is one) runs queued jobs in order, each in chunks: a chunk is
one ``superscopes.run`` call on a sub-grid (one source token x a few layers, every site and
alpha), followed by the judge. Between chunks the job publishes its rows (progress, partial
results, a rate and a time estimate) and checks for cancellation; the chunks of the token the
page has clicked run next. A second phase runs the controls of each best readout (alpha 1,
norm-matched, random direction of the same norm). One queued or running job per page (client
id), and a cap on the queue, so that no page starves the others. Models load lazily and
stay cached. Runs are kept in a small SQLite store (``store.py``), so that a run's URL
(``/?run=<id>``) restores it after a reload or a restart.

Endpoints (all JSON unless stated; POSTs take only same-origin ``application/json``)::

    GET  /                      the page;  GET /static/<file>
    GET  /api/config            models, limits, defaults, templates, the client's active job
    POST /api/tokens            {model, prompt} -> the prompt's tokens and the model's layers
    POST /api/run               a grid -> {job, total, ahead, ...} or {error} (400, 409, 503)
    GET  /api/jobs/<id>?since=N&controls_since=M
                                status, queue place, counts, rate, estimate, settings, and the
                                rows from N on and control rows from M on (live or kept)
    POST /api/jobs/<id>/cancel  drop a queued job, or stop a running one after its chunk
    POST /api/jobs/<id>/focus   {position} -> that token's remaining chunks run next
    GET  /api/jobs/<id>/csv     the results so far as CSV (attachment, formula-safe)
    GET  /api/runs?limit=N      the newest kept grid runs (the history list)
    POST /api/cell              {model, prompt, position, site, layer, k, samples, seed, sae?,
                                generator?} -> a panel job: the cell's SAE breakdown and generated
                                and nearest-corpus inputs (``panels.py``), or why none applies
    POST /api/latent            {model, sae, latent, alphas, max_new_tokens, prompt} -> a panel
                                job: the latent as the source (``sae.latent_scope``, identity target)

Panel jobs (cell, latent) are small: they go through the same queue, bounds and store as grids,
run before queued grids and between a running grid's chunks, one at a time per page (beside its
grid); ``GET /api/jobs/<id>`` serves them with ``kind`` and ``result``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import re
import sqlite3
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pandas as pd

from superscopes.app.panels import Panels, train_command
from superscopes.app.store import RunStore, RunStoreError, check_run_id
from superscopes.models import DEFAULT_MODEL, EMBEDDED

STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}

LIMITS = {
    "max_cells": 2000,  # cells per run (tokens x sites x layers x alphas)
    "max_prompt_chars": 300,
    "max_prompt_tokens": 48,
    "max_template_chars": 1000,
    "max_new_tokens": 32,
    "max_abs_alpha": 1000,
    "max_queued": 32,  # jobs queued or running, all pages together
    "max_latents": 32,  # latents a breakdown lists
    "max_samples": 8,  # generated (and nearest-corpus) inputs a cell panel shows
    "max_latent_alphas": 8,  # alphas of a latent job
}

SITES = {"mlp_in": "MLP input", "mlp_out": "MLP output", "resid_post": "Hidden state"}
TRANSFORMS = {
    "scale": "scale: v' = alpha * v",
    "cfg": "cfg: v' = base + alpha * (v - base)",
    "norm": "norm: v rescaled to the replaced vector's norm, times alpha",
}
DEFAULTS = {
    "prompt": "Diana, Princess of Wales",
    "tokens": "all",
    "layers": "1-7",
    "target_layer": "same",
    "sites": list(SITES),
    "alphas": "1,3,6,9,12,15",
    "transform": "scale",
    "target": "entity",
    "placeholder": "x",
    "max_new_tokens": 10,
    "controls": True,
}
PANEL_DEFAULTS = {"k": 10, "samples": 5, "seed": 0, "alphas": "1,2,4,8", "max_new_tokens": 10, "promotes": 5}
ROW_COLUMNS = ["token", "position", "site", "layer", "target_layer", "alpha", "output", "similarity", "echo"]
# Controls beside each best readout, as the recipes run them: control -> (transform, alpha);
# alpha None is the best readout's own alpha (a random direction with the written vector's norm).
CONTROLS = {"alpha1": ("scale", 1.0), "norm": ("norm", 1.0), "random": ("random", None)}
CONTROL_OF = {transform: name for name, (transform, _) in CONTROLS.items()}
MAX_HISTORY = 100  # runs one history request lists
REMOTE_PREFIX = "ndif:"
MAX_BODY = 64 * 1024
KEEP_JOBS = 32
MAX_FIELD_CHARS = {"client": 64, "model": 200, "placeholder": 40, "layers": 200}  # the rest: LIMITS
SOCKET_TIMEOUT = 30  # seconds a connection may stall mid-request before its thread is freed
LISTEN_BACKLOG = 128  # connections the kernel holds while every handler thread is busy starting
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs such a cell as a formula
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
SECRET_NAMES = ("NDIF_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class BadRequest(ValueError):
    """Input the page should show as it is (HTTP 400)."""


class NotFound(LookupError):
    """An unknown job or file (HTTP 404)."""


class Refused(Exception):
    """A request the server will not serve as sent: ``status`` says why (403, 415, 503)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Busy(Exception):
    def __init__(self, job_id: str, what: str = "a run"):
        super().__init__(f"{what} is already queued or in progress on this page: wait for it to finish or cancel it")
        self.job_id = job_id


def secret_values(environ: Mapping[str, str]) -> list[str]:
    """Values to keep out of pages and logs: the known tokens, and any long enough variable
    whose name says it is a key, token, secret or password; longest first."""
    values = {environ.get(name) or "" for name in SECRET_NAMES}
    values |= {value for name, value in environ.items() if SECRET_NAME.search(name)}
    return sorted((v for v in values if len(v) >= 8), key=len, reverse=True)  # short ones are not secrets


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with secret values replaced by ``***`` (the NDIF key also when it comes from .env)."""
    from superscopes.remote import redact as redact_ndif_key

    for value in secret_values(os.environ if environ is None else environ):
        text = text.replace(value, "***")
    return redact_ndif_key(text)


def _error_text(error: BaseException) -> str:
    """One line for the page: the message of expected errors, the type for unexpected ones."""
    from superscopes.models import FetchError

    if isinstance(error, KeyError) and error.args:
        message = str(error.args[0])
    elif isinstance(error, (ValueError, FetchError, OSError)):
        message = str(error)
    else:
        message = f"{type(error).__name__}: {error}"
    return redact(message or type(error).__name__)


def _log_error(error: BaseException) -> None:
    """The traceback on the terminal, with secrets redacted (never in a reply)."""
    print(redact("".join(traceback.format_exception(error))), file=sys.stderr, end="", flush=True)


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _unique(values: list) -> list:
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------- request parsing
#
# Pure functions: each field is checked against its bound before it is expanded or used, so
# that no request costs more than its size, and each error names the field and what it takes.


def _show(value) -> str:
    """A value for an error message, cut short: a request may carry 64 KB in one field."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_body(raw: bytes | None, content_type: str) -> dict:
    """A job-starting POST's JSON object: only ``application/json`` (a form or a
    ``text/plain`` fetch from another site cannot send it without a CORS preflight), each field
    text, a number, or a list of them."""
    if raw is None:
        raise BadRequest(f"the request body is missing its length or is over {MAX_BODY} bytes")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                      f"send the request as application/json, not {_show(media_type)}")  # fmt: skip
    try:
        body = json.loads(raw or b"{}")
    except RecursionError:
        raise BadRequest("the request nests too deeply: each field is text, a number or a list of them") from None
    except UnicodeDecodeError:
        raise BadRequest("the request is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise BadRequest(f"the request is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request must be a JSON object")
    for name, value in body.items():
        items = value if isinstance(value, list) else [value]
        if isinstance(value, dict) or any(isinstance(item, (list, dict)) for item in items):
            raise BadRequest(f"{_show(name)} nests too deeply: give text, a number or a list of them")
    return body


def _text(body: dict, name: str, default: str = "", max_chars: int | None = None) -> str:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be text, got {_show(value)}")
    cap = max_chars if max_chars is not None else MAX_FIELD_CHARS.get(name)
    if cap is not None and len(value) > cap:
        raise BadRequest(f"{name} has {len(value)} characters; this page takes at most {cap}")
    return value


def parse_whole(value, name: str, low: int, high: int) -> int:
    """A whole number in ``[low, high]``: a JSON integer, an integral float (``4.0``), or digits
    as text; ``1e309`` (infinity once parsed), ``true`` and ``4.5`` are refused."""
    if isinstance(value, float) and value.is_integer():  # False for inf and nan
        value = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,12}\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}, got {_show(value)}")
    return value


def _layer_range(name: str, shown: str, low: int, high: int, num_layers: int, model: str) -> None:
    bad = low if low >= num_layers else num_layers if high >= num_layers else None
    if bad is not None:
        raise BadRequest(f"{name} {shown}: layer {bad} is out of range: {model} has layers 0-{num_layers - 1}")


def check_layers(value, num_layers: int, model: str = "the model") -> None:
    """Refuse a layer list or range with a layer the model lacks, before anything is expanded
    (``"1-1000000000"`` would otherwise be a list of a billion numbers)."""
    if isinstance(value, list):
        for layer in value:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise BadRequest(f"layers {_show(value)}: give whole numbers")
            _layer_range("layers", _show(value), layer, layer, num_layers, model)
        return
    text = str(value if value is not None else "").replace(" ", "")
    if len(text) > MAX_FIELD_CHARS["layers"]:
        raise BadRequest(f"layers has {len(text)} characters; this page takes at most {MAX_FIELD_CHARS['layers']}")
    if text in ("", "all"):
        return  # parse_layers says what to do with an empty field
    from superscopes.parsing import parse_layers as parse

    try:
        parse(text, num_layers, model)  # the one parser, bounded by the model's layers before it expands a range
    except argparse.ArgumentTypeError as error:
        raise BadRequest(str(error)) from None


def parse_layers(value) -> list[int] | str:
    from superscopes.parsing import parse_layers as parse

    if isinstance(value, list):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise BadRequest(f"layers {value!r}: give whole numbers")
        return value
    text = str(value if value is not None else "").replace(" ", "")
    if not text:
        raise BadRequest("layers is empty: give a range such as 1-7, a list such as 1,3,5-7, or all")
    try:
        return parse(text)
    except argparse.ArgumentTypeError as error:
        raise BadRequest(str(error)) from None


def parse_alphas(value, max_count: int, max_abs: float) -> list[float]:
    """Distinct sorted alphas: at most ``max_count`` (counted before any is converted), each
    finite and within ``±max_abs``."""
    if isinstance(value, list):
        items = value
    else:
        items = [x for x in str(value if value is not None else "").replace(" ", "").split(",") if x]
    if not items:
        raise BadRequest("alphas is empty: give numbers such as 1,3,6,9,12,15")
    if len(items) > max_count:
        raise BadRequest(f"alphas has {len(items)} values; a run takes at most {max_count} (the cell cap)")
    alphas = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise TypeError
            alpha = float(item)
        except (TypeError, ValueError):
            raise BadRequest(f"alpha {_show(item)} is not a number") from None
        if not math.isfinite(alpha):
            raise BadRequest(f"alpha {alpha} is not a finite number")
        if abs(alpha) > max_abs:
            raise BadRequest(f"alpha {alpha:g} is out of range: alphas go from -{max_abs:g} to {max_abs:g}")
        alphas.append(alpha)
    return sorted(_unique(alphas))


def parse_target_layer(value, num_layers: int, model: str = "the model") -> int | str:
    if value == "same":
        return "same"
    try:
        layer = parse_whole(value, "target_layer", -(10**12), 10**12)
    except BadRequest:
        raise BadRequest(f"target_layer {_show(value)}: use same, or a layer of {model} (0-{num_layers - 1})") from None
    if not 0 <= layer < num_layers:
        raise BadRequest(f"target_layer {layer} is out of range: {model} has layers 0-{num_layers - 1}")
    return layer


def parse_sites(value) -> list[str]:
    sites = [s for s in value.split(",") if s] if isinstance(value, str) else value
    if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
        raise BadRequest(f"sites must be a list of site names, got {_show(sites)}")
    if not sites:
        raise BadRequest(f"pick at least one site ({', '.join(SITES.values())})")
    for site in sites:
        if site not in SITES:
            raise BadRequest(f"site {_show(site)} is not valid here; choose from {', '.join(SITES)}")
    return _unique(sites)


def cross_site(origin: str | None, fetch_site: str | None, host: str) -> str | None:
    """Why a POST comes from a page on another origin (another site, or another port of this
    machine), or None. Scripts send neither header; browsers send at least one."""
    if fetch_site is not None and fetch_site.strip().lower() not in ("same-origin", "none"):
        return f"Sec-Fetch-Site is {_show(fetch_site)}"
    if origin is not None and origin.strip().lower() != f"http://{host.strip().lower()}":
        return f"Origin {_show(origin)} is not this server's"
    return None


def parse_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, got {_show(value)}")
    return value


def reused_controls(transform: str, alphas: list[float]) -> set[str]:
    """Controls whose readout the grid already holds (same transform, alpha 1): not run again."""
    return {name for name, (t, alpha) in CONTROLS.items() if t == transform and alpha in alphas}


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


def csv_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with text cells that a spreadsheet would run as a formula prefixed by ``'``."""

    def cell(value):
        return "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value

    text_columns = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    return frame.assign(**{c: frame[c].map(cell) for c in text_columns})


# ---------------------------------------------------------------- jobs


@dataclass
class Job:
    id: str
    client: str
    model: str
    prompt: str
    total: int
    grid: dict  # what the page needs to lay out tables and heatmaps
    chunks: list[tuple[int, object]]  # (source position, sub-grid Scope), to run
    settings: dict = field(default_factory=dict)  # the form's fields, to restore it from a URL
    common: dict = field(default_factory=dict)  # Scope settings the control phase shares
    controls_on: bool = False
    controls_total: int = 0  # control cells to run (reused ones not counted)
    controls_done: int = 0
    controls: list[dict] = field(default_factory=list)
    focus: int | None = None  # the clicked token: its chunks run next
    remote: bool = False
    kind: str = "grid"  # grid | cell | latent (the last two: panel jobs)
    request: dict = field(default_factory=dict)  # a panel job's checked request
    result: dict | None = None  # a panel job's result
    status: str = "queued"  # queued | running | done | cancelled | error
    done: int = 0
    error: str | None = None
    rows: list[dict] = field(default_factory=list)
    frames: list[pd.DataFrame] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    started: float = field(default_factory=time.time)
    running_since: float | None = None  # once the model is loaded: the rate counts compute only
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")

    def next_chunk(self):
        """The next chunk's Scope (the focused token's first), or None when none is left."""
        with self.lock:
            if not self.chunks:
                return None
            index = next((i for i, (p, _) in enumerate(self.chunks) if p == self.focus), 0)
            return self.chunks.pop(index)[1]

    def state(self, since: int = 0, ahead: int = 0, controls_since: int = 0) -> dict:
        """``ahead``: jobs that run before this queued one (the running one included)."""
        with self.lock:
            since = max(0, min(since, len(self.rows)))
            controls_since = max(0, min(controls_since, len(self.controls)))
            now = self.finished or time.time()
            cells, planned = self.done + self.controls_done, self.total + self.controls_total
            rate = eta = None
            if self.running_since is not None and cells and now > self.running_since:
                rate = cells / (now - self.running_since)  # measured cells per second
                eta = round((planned - cells) / rate, 1) if self.status == "running" else None
            return {
                "job": self.id,
                "status": self.status,
                "ahead": ahead,
                "cancelling": self.cancel.is_set() and self.active,
                "done": self.done,
                "total": self.total,
                "controls_done": self.controls_done,
                "controls_total": self.controls_total,
                "rate": None if rate is None else round(rate, 2),
                "eta": eta,
                "focus": self.focus,
                "error": self.error,
                "model": self.model,
                "prompt": self.prompt,
                "settings": self.settings,
                "grid": self.grid,
                "rows": self.rows[since:],
                "next": len(self.rows),
                "controls": self.controls[controls_since:],
                "controls_next": len(self.controls),
                "created": self.created,
                "elapsed": round(now - self.started, 1),
                "kind": self.kind,
                "request": self.request,
                "result": self.result,
            }

    def summary(self) -> dict:
        """The history list's line for this run; a panel job's says its kind (the history
        lists grids only), and a finished latent job's its self-explanation."""
        with self.lock:
            scores = [r["similarity"] for r in self.rows if r["similarity"] is not None]
            line = {"model": self.model, "prompt": self.prompt, "done": self.done, "total": self.total,
                    "best": max(scores, default=None)}  # fmt: skip
            if self.kind != "grid":
                line |= {"kind": self.kind, "sae": self.request.get("sae"), "latent": self.request.get("latent"),
                         "explanation": (self.result or {}).get("explanation")}  # fmt: skip
            return line

    def frame(self) -> pd.DataFrame:
        with self.lock:
            frames = list(self.frames)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40] or "prompt"


class App:
    """State shared by the request handlers: model cache, jobs, judge and limits.

    ``models``: already-loaded models to offer (name -> nnsight model), e.g. a tiny one in
    tests. ``judge``: ``frame -> frame with a similarity column`` (default: the MiniLM judge).
    ``chunk_rows``: about how many patched rows one ``superscopes.run`` call gets.
    ``store``: where runs are kept across restarts (None: only in this process's memory).
    ``saes``, ``generators``, ``corpora``: what the cell panels may use (``panels.Panels``);
    the embedded SAEs are offered with the embedded models (``offer_embedded``).
    """

    def __init__(
        self,
        default_model: str = DEFAULT_MODEL,
        models: dict | None = None,
        judge: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
        remote_models: list[str] | None = None,
        limits: dict | None = None,
        chunk_rows: int = 32,
        batch_size: int = 64,
        offer_embedded: bool = True,
        store: RunStore | None = None,
        saes: Sequence = (),
        generators: Sequence = (),
        corpora: Sequence = (),
    ):
        from superscopes.judge import DEFAULT_THRESHOLD
        from superscopes.remote import settings

        self.limits = {**LIMITS, **(limits or {})}
        self.loaded: dict[str, object] = dict(models or {})
        self.injected = set(self.loaded)
        self.default_model = default_model
        self.judge = judge
        self.threshold = DEFAULT_THRESHOLD
        self.chunk_rows = chunk_rows
        self.batch_size = batch_size
        names = [*self.loaded, default_model, *(EMBEDDED if offer_embedded else [])]
        self.local_models = _unique([n for n in names if not n.startswith(REMOTE_PREFIX)])
        ndif = settings()  # a key for public NDIF; a self-hosted server may need only its host
        self.remote_configured = bool(ndif["NDIF_API_KEY"] or ndif["NDIF_HOST"])
        self.remote_models = (
            [REMOTE_PREFIX + n for n in _unique(remote_models or list(EMBEDDED))] if self.remote_configured else []
        )
        if default_model.startswith(REMOTE_PREFIX) and default_model not in self.remote_models:
            self.remote_models.insert(0, default_model)
        self.store = store
        self.keep_lock = threading.Lock()  # a save snapshots and writes at once: a later state always wins
        self.jobs: dict[str, Job] = {}
        self.jobs_lock = threading.Lock()
        self.queue: deque[Job] = deque()  # waiting jobs, run in order by one worker thread
        self.queue_changed = threading.Condition(self.jobs_lock)
        self.current: Job | None = None  # the job the worker runs
        self.worker: threading.Thread | None = None
        self.closed = False
        self.load_locks: dict[str, threading.Lock] = {}
        self.tokenizers: dict[int, tuple] = {}  # id(model) -> (model, tokenizer copy)
        self.tokenizer_lock = threading.Lock()
        self.panels = Panels(saes, generators, corpora, embedded=offer_embedded)
        self.quick: deque[Job] = deque()  # panel jobs: before queued grids and between a grid's chunks
        self.explained: dict[tuple[str, int], dict] = {}  # (sae, latent) -> its latest self-explanation
        try:
            explained = store.recent(KEEP_JOBS * 4, kind="latent") if store is not None else []
        except RunStoreError as error:  # locked by another process: the page works without them
            _log_error(error)
            explained = []
        for run in reversed(explained):
            if run.get("explanation"):
                self.explained[(run["sae"], run["latent"])] = run["explanation"] | {"job": run["id"]}

    # ------------------------------------------------------------ models

    def model_choices(self) -> list[dict]:
        choices = [
            {"id": n, "label": n + (" (local)" if n in EMBEDDED else ""), "remote": False, "loaded": n in self.loaded}
            for n in self.local_models
        ]
        choices += [
            {"id": n, "label": f"{n[len(REMOTE_PREFIX):]} (NDIF)", "remote": True, "loaded": n in self.loaded}
            for n in self.remote_models
        ]
        return choices

    def model(self, name: str):
        """The named model, loaded on first use and cached in this process."""
        if name not in self.local_models and name not in self.remote_models:
            offered = ", ".join(self.local_models + self.remote_models)
            raise BadRequest(f"model {name!r} is not offered by this server; choose from {offered}")
        if name in self.loaded:
            return self.loaded[name]
        with self.jobs_lock:
            lock = self.load_locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self.loaded:
                import superscopes

                remote = name.startswith(REMOTE_PREFIX)
                self.loaded[name] = superscopes.load(name[len(REMOTE_PREFIX) :] if remote else name, remote=remote)
            return self.loaded[name]

    def score(self, frame: pd.DataFrame) -> pd.DataFrame:
        if self.judge is not None:
            return self.judge(frame)
        from superscopes.judge import score

        return score(frame)

    # ------------------------------------------------------------ API

    def config(self, client: str | None = None) -> dict:
        from superscopes.prompts import TEMPLATES

        active = self.active_job(client) if client else None
        return {
            "models": self.model_choices(),
            "default_model": self.default_model,
            "remote_configured": self.remote_configured,
            "limits": self.limits,
            "sites": SITES,
            "transforms": TRANSFORMS,
            "templates": {name: {"text": t.text, "placeholder": t.placeholder} for name, t in TEMPLATES.items()},
            "defaults": DEFAULTS,
            "threshold": self.threshold,
            "active_job": active.id if active else None,
            "keeps_runs": self.store is not None,
            "panels": self.panels.config() | {"defaults": PANEL_DEFAULTS},
        }

    def tokens(self, body: dict) -> dict:
        from superscopes.sites import num_layers

        name = _text(body, "model", self.default_model) or self.default_model
        prompt = self._prompt(body)
        model = self.model(name)
        return {
            "model": name,
            "prompt": prompt,
            "tokens": self._tokens(model, prompt) if prompt else [],
            "num_layers": num_layers(model),
        }

    def _prompt(self, body: dict) -> str:
        prompt = _text(body, "prompt")
        cap = self.limits["max_prompt_chars"]
        if len(prompt) > cap:
            raise BadRequest(f"the prompt has {len(prompt)} characters; this page takes at most {cap}")
        return prompt

    def _tokenizer(self, model):
        """A private copy of the model's tokenizer, for the request path (hold ``tokenizer_lock``):
        a fast tokenizer used from two threads at once (a request and the worker) can fail."""
        import copy

        key = id(model)
        if key not in self.tokenizers:
            self.tokenizers[key] = (model, copy.deepcopy(model.tokenizer))
        return self.tokenizers[key][1]

    def _tokens(self, model, prompt: str) -> list[dict]:
        """The prompt's tokens, with the private tokenizer."""
        from superscopes.prompts import tokens

        with self.tokenizer_lock:
            tokenizer = self._tokenizer(model)
            ids = tokenizer(prompt)["input_ids"]
            special = set(tokenizer.all_special_ids)
            texts = tokens(tokenizer, prompt)
        return [
            {"index": i, "text": text, "special": token_id in special}
            for i, (token_id, text) in enumerate(zip(ids, texts))
        ]

    def active_job(self, client: str) -> Job | None:
        with self.jobs_lock:
            return next((j for j in self.jobs.values() if j.client == client and j.active), None)

    def job(self, job_id: str) -> Job:
        with self.jobs_lock:
            job = self.jobs.get(check_run_id(job_id))
        if job is None:
            raise NotFound(f"no job {job_id!r} running on this server (it may have finished before a restart)")
        return job

    def _kept(self, job_id: str) -> dict:
        """A kept run's state (a run of an earlier server, or one dropped from memory)."""
        try:
            kept = self.store.state(check_run_id(job_id)) if self.store is not None else None
        except RunStoreError as error:
            raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, str(error)) from None
        if kept is None:
            raise NotFound(f"no run {job_id!r} on this server: it was never run here, or the history dropped it")
        return kept

    def state(self, job_id: str, since: int = 0, controls_since: int = 0) -> dict:
        """A live job's state, else the kept run's (rows from ``since``, controls from ``controls_since``)."""
        with self.jobs_lock:
            job = self.jobs.get(check_run_id(job_id))
            ahead = self._ahead(job) if job is not None else 0
        if job is not None:
            return self._explain(job.state(since, ahead, controls_since))
        kept = self._kept(job_id)
        return self._explain(kept | {
            "rows": kept["rows"][max(0, since) :], "controls": kept["controls"][max(0, controls_since) :],
            "ahead": 0, "cancelling": False, "eta": None,
        })  # fmt: skip

    def _ahead(self, job: Job) -> int:
        """Jobs that run before a queued one (hold ``jobs_lock``): panel jobs wait only for
        those queued before them and the running chunk; grids, for every panel job too."""
        if job in self.quick:
            return self.quick.index(job) + (self.current is not None)
        if job in self.queue:
            return len(self.quick) + self.queue.index(job) + (self.current is not None)
        return 0

    def _explain(self, state: dict) -> dict:
        """A cell job's state with the self-explanations run since for its latents."""
        result = state.get("result") or {}
        sae_id = (result.get("sae") or {}).get("id")
        if state.get("kind") == "cell" and sae_id:
            latents = [row["latent"] for row in result["sae"].get("latents", [])]
            state["explanations"] = {str(i): self.explained[(sae_id, i)] for i in latents
                                     if (sae_id, i) in self.explained}  # fmt: skip
        return state

    def runs(self, limit: int) -> dict:
        """The newest runs for the history list: kept ones, with live ones' progress."""
        with self.jobs_lock:
            live = dict(self.jobs)
        try:
            found = self.store.recent(limit) if self.store is not None else None
        except RunStoreError as error:  # locked or unreadable: this server's own runs still list
            _log_error(error)
            found = None
        if found is None:
            grids = [j for j in live.values() if j.kind == "grid"]
            newest = sorted(grids, key=lambda j: j.started, reverse=True)[:limit]
            found = [{"id": j.id, "created": j.started, "status": j.status} for j in newest]
        runs = []
        for run in found:
            job = live.get(run["id"])
            runs.append(run | (job.summary() | {"status": job.status} if job is not None else {}))
        return {"runs": runs}

    def focus(self, job_id: str, body: dict) -> dict:
        """Run the remaining chunks of the token at ``position`` next."""
        position = parse_whole(body.get("position"), "position", 0, self.limits["max_prompt_tokens"] - 1)
        job = self.job(job_id)
        if job.kind != "grid":
            raise BadRequest(f"job {job.id} is a {job.kind} panel job, not a grid: it has no tokens to reorder")
        positions = job.grid["positions"]
        if position not in positions:
            raise BadRequest(f"position {position} is not a source token of this run; its source tokens are at {positions}")
        with job.lock:
            job.focus = position
        return {"job": job.id, "focus": position}

    def keep(self, job: Job, now: bool = False) -> None:
        """Save the job in the store: its settings at the start, its rows after each chunk,
        everything when it stops (``now``: the worker tries at once). Requests only hand the
        snapshot to the store's writer; a failure is logged, never the job's."""
        if self.store is None:
            return
        try:
            with self.keep_lock:  # snapshots are taken in order: the store writes the newest last
                state = job.state() | {"ahead": 0, "cancelling": False, "eta": None}
                with job.lock:
                    frames = list(job.frames)
                data = (lambda: csv_safe(pd.concat(frames, ignore_index=True)).to_csv(index=False).encode()) \
                    if job.kind == "grid" and frames else None  # fmt: skip
                save = self.store.save_now if now else self.store.save_later
                save(job.id, job.created, state["status"], job.summary(), state, data)
        except Exception as error:  # a full disk must not fail the run
            _log_error(error)

    def _admit(self, client: str, panel: bool = False) -> None:
        """Refuse a second grid (or a second panel job: ``panel``) from one page, or any job
        while the queue is full (the caller holds ``jobs_lock``)."""
        running = next((j for j in self.jobs.values()
                        if j.client == client and j.active and (j.kind != "grid") == panel), None)  # fmt: skip
        if running is not None:
            raise Busy(running.id, f"a {running.kind} panel job" if panel else "a run")
        waiting = len(self.queue) + len(self.quick) + (self.current is not None)
        if waiting >= self.limits["max_queued"]:
            raise Refused(HTTPStatus.SERVICE_UNAVAILABLE,
                          f"the queue is full ({waiting} runs): try again when one finishes")  # fmt: skip

    def prepare(self, body: dict) -> Job:
        """Parse and bound the grid (pure checks first), validate it with the core's ``plan``,
        and cut it into chunks. Takes no lock that a running job holds."""
        from superscopes import Scope
        from superscopes.models import model_name
        from superscopes.prompts import tokens
        from superscopes.scope import plan
        from superscopes.sites import num_layers

        client = _text(body, "client") or "anonymous"
        name = _text(body, "model", self.default_model) or self.default_model
        prompt = self._prompt(body)
        if not prompt.strip():
            raise BadRequest("the prompt is empty: type the text whose tokens you want to scope")
        mode = _text(body, "tokens", "all", max_chars=10)
        if mode not in ("all", "last", "match"):
            raise BadRequest(f"tokens {mode!r}: choose all, last or match")
        match = _text(body, "token", max_chars=self.limits["max_prompt_chars"])
        if mode == "match" and not match:
            raise BadRequest("type the token to scope (a piece of the prompt), or choose all or last tokens")
        sites = parse_sites(body.get("sites", DEFAULTS["sites"]))
        alphas = parse_alphas(body.get("alphas", DEFAULTS["alphas"]), self.limits["max_cells"],
                              self.limits["max_abs_alpha"])  # fmt: skip
        transform = _text(body, "transform", "scale", max_chars=20)
        if transform not in TRANSFORMS:
            raise BadRequest(f"transform {transform!r} is not offered here; choose {', '.join(TRANSFORMS)}")
        target_kind = _text(body, "target", "entity", max_chars=20)
        placeholder = None
        if target_kind == "custom":
            target = _text(body, "template", max_chars=self.limits["max_template_chars"])
            placeholder = _text(body, "placeholder", "x") or "x"
            if not target.strip():
                raise BadRequest("the custom target template is empty: write a prompt containing the placeholder")
        elif target_kind in ("entity", "identity"):
            target = target_kind
        else:
            raise BadRequest(f"target {target_kind!r}: choose entity, identity or custom")
        max_new_tokens = parse_whole(body.get("max_new_tokens", DEFAULTS["max_new_tokens"]), "max_new_tokens",
                                     1, self.limits["max_new_tokens"])  # fmt: skip
        controls = parse_flag(body.get("controls", DEFAULTS["controls"]), "controls")
        focus = body.get("focus")
        if focus is not None:  # a token the page has clicked: runs first if it is a source token
            focus = parse_whole(focus, "focus", 0, self.limits["max_prompt_tokens"] - 1)
        with self.jobs_lock:
            self._admit(client)  # before a model load: a refused page costs nothing

        model = self.model(name)
        n_layers, label = num_layers(model), model_name(model)
        raw_layers = body.get("layers", DEFAULTS["layers"])
        check_layers(raw_layers, n_layers, label)
        layers = parse_layers(raw_layers)
        layer_list = list(range(n_layers)) if layers == "all" else sorted(_unique(layers))
        target_layer = parse_target_layer(body.get("target_layer", DEFAULTS["target_layer"]), n_layers, label)

        pieces = self._tokens(model, prompt)  # at most max_prompt_chars characters
        if len(pieces) > self.limits["max_prompt_tokens"]:
            raise BadRequest(
                f"the prompt has {len(pieces)} tokens; this page takes at most {self.limits['max_prompt_tokens']}"
            )
        n_tokens = sum(not p["special"] for p in pieces) if mode == "all" else 1
        if mode == "all" and not n_tokens:
            raise BadRequest("the prompt has only special tokens: type some text")
        n_cells = n_tokens * len(sites) * len(layer_list) * len(alphas)
        if n_cells > self.limits["max_cells"]:
            raise BadRequest(
                f"the grid has {n_cells} cells ({n_tokens} tokens x {len(sites)} sites x "
                f"{len(layer_list)} layers x {len(alphas)} alphas), over this page's cap of "
                f"{self.limits['max_cells']}: choose fewer tokens, layers, sites or alphas"
            )
        per_best = len(CONTROLS) - len(reused_controls(transform, alphas)) if controls else 0
        n_controls = n_tokens * len(sites) * len(layer_list) * per_best
        if n_cells + n_controls > self.limits["max_cells"]:
            raise BadRequest(
                f"the grid's {n_cells} cells and {n_controls} control cells ({per_best} per best readout) make "
                f"{n_cells + n_controls}, over this page's cap of {self.limits['max_cells']}: choose fewer tokens, "
                "layers or sites, or turn the controls off"
            )

        common = dict(
            sites=sites, alphas=alphas, transforms=[transform], target=target, placeholder=placeholder,
            target_layers=[target_layer], max_new_tokens=max_new_tokens, batch_size=self.batch_size,
        )  # fmt: skip
        where = {"all": {"all_tokens": True}, "last": {"position": -1}, "match": {"token": match}}[mode]
        full = Scope(prompt, layers=layer_list, **where, **common)
        full.max_cells = 10**9  # bounded above; this page's cap counts only the tokens it runs
        with self.tokenizer_lock:  # plan tokenises: give it the private tokenizer, not the worker's
            the_plan = plan(_WithTokenizer(model, self._tokenizer(model)), full)  # raises ScopeError
            patched = the_plan.targets[0]
            target_token = tokens(self._tokenizer(model), patched.text)[patched.index]  # the token the vector replaces

        positions = [s.position for s in the_plan.sources]
        if mode == "all":
            positions = [p for p in positions if not pieces[p]["special"]]

        # Chunks: a few layers of one source token, every site and alpha; layer groups
        # outermost so that every token fills in from its first layers on.
        per_layer = len(sites) * len(alphas)
        step = max(1, self.chunk_rows // per_layer)
        chunks = [
            (p, Scope(prompt, position=p, layers=layer_list[i : i + step], **common))
            for i in range(0, len(layer_list), step)
            for p in positions
        ]
        settings = {
            "model": name, "prompt": prompt, "tokens": mode, "token": match,
            "layers": raw_layers if isinstance(raw_layers, str) else ",".join(map(str, raw_layers)),
            "target_layer": target_layer, "sites": sites, "alphas": ",".join(f"{a:g}" for a in alphas),
            "transform": transform, "target": target_kind, "template": target if target_kind == "custom" else "",
            "placeholder": placeholder or DEFAULTS["placeholder"], "max_new_tokens": max_new_tokens,
            "controls": controls,
        }  # fmt: skip
        grid = {
            "tokens": pieces,
            "positions": positions,
            "sites": sites,
            "layers": layer_list,
            "alphas": alphas,
            "transform": transform,
            "target_layer": target_layer,
            "target": patched.text,
            "target_token": target_token,
            "threshold": self.threshold,
        }
        return Job(
            id=uuid.uuid4().hex[:12], client=client, model=name, prompt=prompt, total=n_cells, grid=grid,
            chunks=chunks, settings=settings, common=common, controls_on=controls, controls_total=n_controls,
            focus=focus, remote=name.startswith(REMOTE_PREFIX),
        )  # fmt: skip

    def start(self, body: dict) -> dict:
        """Queue a grid; its state, with how many jobs run before it."""
        return self._enqueue(self.prepare(body), self.queue)  # admitted again there: others may have queued since

    def cancel(self, job_id: str) -> dict:
        """Drop a queued job at once; a running one stops after the chunk in progress."""
        job = self.job(job_id)
        job.cancel.set()
        with self.jobs_lock:
            waiting = self.quick if job in self.quick else self.queue
            dropped = job in waiting
            if dropped:
                waiting.remove(job)
                with job.lock:
                    job.status, job.finished = "cancelled", time.time()
        if dropped:
            self.keep(job)
        return job.state(len(job.rows), 0, len(job.controls)) | {"rows": [], "controls": []}

    # ------------------------------------------------------------ panel jobs (panels.py)

    def _panel_model(self, body: dict) -> tuple[str, object, tuple[str, ...], int]:
        """The request's model (local only): its name, the model, the names an SAE or generator
        may record for it, and its hidden size."""
        from superscopes.models import model_name
        from superscopes.sites import hidden_size

        name = _text(body, "model", self.default_model) or self.default_model
        if name in self.remote_models:
            raise BadRequest(f"model {name!r}: the SAE, latent and generated-input panels run on local models only")
        model = self.model(name)
        return name, model, (name, model_name(model)), hidden_size(model)

    def _offer(self, body: dict, kind: str, names: tuple[str, ...], hidden: int, site: str | None = None,
               layer: int | None = None) -> str | None:  # fmt: skip
        """The SAE or generator the request names (``body[kind]``), checked against the model
        (and the cell's ``site``/``layer``): 400 naming the field when it does not fit."""
        wanted = _text(body, kind, max_chars=200)
        if not wanted:
            return None
        offers = self.panels.offered(kind)
        if wanted not in offers:
            loaded = ", ".join(offers) or "none"
            raise BadRequest(f"{kind} {_show(wanted)} is not loaded on this server; loaded: {loaded}")
        reason = offers[wanted].misfit(names, hidden, site, layer)
        if reason is not None:
            where = names[0] if site is None else f"{names[0]} {site} layer {layer}"
            raise BadRequest(f"{kind} {_show(wanted)} does not fit {where}: {reason}")
        return wanted

    def prepare_cell(self, body: dict) -> Job:
        """A cell panel job: bounds every field, picks the SAE, generator and corpus that apply
        (or records why none does) from their recorded model, site, layer and width."""
        from superscopes.sites import num_layers

        client = _text(body, "client") or "anonymous"
        name, model, names, hidden = self._panel_model(body)
        prompt = self._prompt(body)
        if not prompt.strip():
            raise BadRequest("the prompt is empty: a cell is a token of a prompt")
        pieces = self._tokens(model, prompt)
        if len(pieces) > self.limits["max_prompt_tokens"]:
            cap = self.limits["max_prompt_tokens"]
            raise BadRequest(f"the prompt has {len(pieces)} tokens; this page takes at most {cap}")
        position = parse_whole(body.get("position"), "position", 0, len(pieces) - 1)
        site = _text(body, "site", max_chars=20)
        if site not in SITES:
            raise BadRequest(f"site {_show(site)} is not valid here; choose from {', '.join(SITES)}")
        layer = parse_whole(body.get("layer"), "layer", 0, num_layers(model) - 1)
        k = parse_whole(body.get("k", PANEL_DEFAULTS["k"]), "k", 1, self.limits["max_latents"])
        samples = parse_whole(body.get("samples", PANEL_DEFAULTS["samples"]), "samples", 1, self.limits["max_samples"])
        seed = parse_whole(body.get("seed", PANEL_DEFAULTS["seed"]), "seed", 0, 2**31 - 1)
        request = {"position": position, "token": pieces[position]["text"], "site": site, "layer": layer, "k": k,
                   "samples": samples, "seed": seed, "promotes": PANEL_DEFAULTS["promotes"]}  # fmt: skip
        for kind in ("sae", "generator", "corpus"):
            chosen = self._offer(body, kind, names, hidden, site, layer) if kind != "corpus" else None
            why = ""
            if chosen is None:
                chosen, why = self.panels.pick(kind, names, hidden, site, layer)
            request[kind], request[f"{kind}_why"] = chosen, why
        if request["generator"] is None:
            request["train_command"] = train_command(name, site, layer)
        with self.jobs_lock:
            self._admit(client, panel=True)
        return Job(id=uuid.uuid4().hex[:12], client=client, model=name, prompt=prompt, total=1, grid={}, chunks=[],
                   kind="cell", request=request)  # fmt: skip

    def prepare_latent(self, body: dict) -> Job:
        """A latent panel job: an SAE that fits the model, one of its latents, a few alphas."""
        client = _text(body, "client") or "anonymous"
        name, model, names, hidden = self._panel_model(body)
        if not _text(body, "sae", max_chars=200):
            loaded = ", ".join(self.panels.saes) or "none loaded"
            raise BadRequest(f"sae is missing: name the SAE whose latent is the source ({loaded})")
        sae_id = self._offer(body, "sae", names, hidden)
        size = self.panels.saes[sae_id].size
        latent = parse_whole(body.get("latent"), "latent", 0, size - 1)
        alphas = parse_alphas(body.get("alphas", PANEL_DEFAULTS["alphas"]), self.limits["max_latent_alphas"],
                              self.limits["max_abs_alpha"])  # fmt: skip
        max_new_tokens = parse_whole(body.get("max_new_tokens", PANEL_DEFAULTS["max_new_tokens"]), "max_new_tokens",
                                     1, self.limits["max_new_tokens"])  # fmt: skip
        prompt = self._prompt(body)  # the prompt the latent was read from: what the readouts are judged against
        request = {"sae": sae_id, "latent": latent, "alphas": alphas, "max_new_tokens": max_new_tokens}
        with self.jobs_lock:
            self._admit(client, panel=True)
        return Job(id=uuid.uuid4().hex[:12], client=client, model=name, prompt=prompt, total=len(alphas), grid={},
                   chunks=[], kind="latent", request=request)  # fmt: skip

    def start_panel(self, job: Job) -> dict:
        """Queue a panel job ahead of queued grids; its state."""
        return self._enqueue(job, self.quick, panel=True)

    def _enqueue(self, job: Job, queue, panel: bool = False) -> dict:
        """Admit ``job`` (per-client caps), keep at most KEEP_JOBS finished jobs, append it to
        ``queue`` (grids, or the panel jobs that run first), wake the one worker; its state."""
        with self.jobs_lock:
            self._admit(job.client, panel=panel)
            self.jobs[job.id] = job
            finished = [j for j in self.jobs.values() if not j.active]
            for old in sorted(finished, key=lambda j: j.finished or j.started)[: max(0, len(self.jobs) - KEEP_JOBS)]:
                del self.jobs[old.id]
            queue.append(job)
            ahead = self._ahead(job)
            if self.worker is None:
                self.worker = threading.Thread(target=self._worker, name="superscopes-worker", daemon=True)
                self.worker.start()
            self.queue_changed.notify()
        self.keep(job)
        return job.state(0, ahead)

    def _panels_waiting(self) -> None:
        """Run the queued panel jobs now (the worker, between a grid's chunks)."""
        while True:
            with self.jobs_lock:
                if not self.quick or self.closed:
                    return
                job = self.quick.popleft()
            self._panel(job)

    def _panel(self, job: Job) -> None:
        with job.lock:
            job.status, job.started = "running", time.time()
            job.running_since = job.started
        try:
            model = self.model(job.model)
            result = self._cell(job, model) if job.kind == "cell" else self._latent(job, model)
            status, error = "done", None
        except Exception as exc:  # reported to the page; the traceback goes to the terminal
            _log_error(exc)
            result, status, error = None, "error", _error_text(exc)
        with job.lock:
            job.result, job.status, job.error, job.finished = result, status, error, time.time()
            job.done = job.total if status == "done" else 0
        self.keep(job, now=True)

    def _cell(self, job: Job, model) -> dict:
        from superscopes.app.panels import breakdown, generated, nearest, read_vector

        r, panels = job.request, self.panels
        vector = read_vector(model, job.prompt, r["site"], r["layer"], r["position"])
        result: dict = {"norm": float(vector.norm())}
        if r["sae"]:
            sae = panels.sae(r["sae"])
            result["sae"] = {"id": r["sae"], "label": repr(sae)} | breakdown(model, sae, vector, r["k"], r["promotes"])
        else:
            result["sae"] = {"id": None, "why": r["sae_why"], "available": panels.config()["saes"]}
        generator = panels.generators[r["generator"]] if r["generator"] else None
        if generator is not None:
            inputs = generated(model, generator.loaded, vector, r["samples"], r["seed"])
            result["generated"] = {"id": generator.id, "detail": generator.detail, "seed": r["seed"], "inputs": inputs}
        else:
            result["generated"] = {"id": None, "why": r["generator_why"], "command": r["train_command"]}
        if r["corpus"]:
            corpus = panels.corpora[r["corpus"]]
            inputs, scale = nearest(model, corpus.loaded, vector, r["samples"],
                                   None if generator is None else generator.loaded.std)  # fmt: skip
            result["nearest"] = {"id": corpus.id, "detail": corpus.detail, "inputs": inputs, "std": scale}
        else:
            result["nearest"] = {"id": None, "why": r["corpus_why"]}
        return result

    def _latent(self, job: Job, model) -> dict:
        from superscopes.app.panels import latent_frame
        from superscopes.metrics import is_echo

        r = job.request
        frame, scale = latent_frame(model, self.panels.sae(r["sae"]), r["latent"], r["alphas"], r["max_new_tokens"],
                                    self.batch_size)  # fmt: skip
        if job.prompt.strip():  # judged against the prompt the latent was read from, as the grid's readouts
            frame["similarity"] = self.score(frame.assign(source=job.prompt))["similarity"].to_numpy()
        else:
            frame["similarity"] = None
        rows = [{"alpha": float(row.alpha), "output": row.output, "similarity": _finite(row.similarity),
                 "self_similarity": _finite(float(row.self_similarity)),
                 "relevancy_mean": _finite(float(row.relevancy_mean)), "echo": is_echo(row.output, "", row.target)}
                for row in frame.itertuples(index=False)]  # fmt: skip
        # The self-explanation: the alpha whose text depends most on the latent (mean relevancy, as
        # recipes/sae_self_explanation.py chooses), ties to the smaller alpha.
        scored = [row for row in rows if row["relevancy_mean"] is not None]
        chosen = max(scored, key=lambda row: row["relevancy_mean"], default=None)
        explanation = None if chosen is None else {k: chosen[k] for k in ("alpha", "output", "self_similarity",
                                                                          "relevancy_mean")}  # fmt: skip
        if explanation is not None:
            self.explained[(r["sae"], r["latent"])] = explanation | {"job": job.id}
        return {"rows": rows, "scale": scale, "target": str(frame["target"].iloc[0]), "explanation": explanation,
                "layer": int(frame["target_layer"].iloc[0])}  # fmt: skip

    def close(self) -> None:
        """Cancel every job and stop the worker after its chunk in progress."""
        with self.jobs_lock:
            self.closed = True
            for job in [*self.queue, *self.quick]:
                job.cancel.set()
            if self.current is not None:
                self.current.cancel.set()
            self.queue_changed.notify_all()

    def _worker(self) -> None:
        while True:
            with self.jobs_lock:
                while not self.queue and not self.quick and not self.closed:
                    self.queue_changed.wait()
                if self.closed:
                    return
                if self.quick:
                    job = self.quick.popleft()
                else:
                    job = self.current = self.queue.popleft()
            if job.kind != "grid":
                self._panel(job)
                continue
            with job.lock:
                job.status, job.started = "running", time.time()
            try:
                self._work(job)
            finally:
                with self.jobs_lock:
                    self.current = None

    def _work(self, job: Job) -> None:
        try:
            model = self.model(job.model)
            if job.remote:  # the page shows progress; keep nnsight's per-request spinner off the terminal
                from nnsight import CONFIG

                CONFIG.APP.REMOTE_LOGGING = False
            with job.lock:
                job.running_since = time.time()
            self._chunks(job, model)
            if job.controls_on and not job.cancel.is_set():
                self._controls(job, model)
            with job.lock:
                complete = job.done == job.total and job.controls_done == job.controls_total
            status, error = ("done" if complete else "cancelled"), None
        except Exception as exc:  # reported to the page; the traceback goes to the terminal
            _log_error(exc)
            status, error = "error", _error_text(exc)
        with job.lock:
            job.status, job.error, job.finished = status, error, time.time()
        self.keep(job, now=True)

    def _chunks(self, job: Job, model, control: bool = False) -> None:
        """Run the job's chunks in turn (the focused token's first), publishing each one's rows:
        grid rows, or control rows (``control``) named by their transform."""
        import superscopes
        from superscopes.judge import flag_echoes

        while not job.cancel.is_set() and (chunk := job.next_chunk()) is not None:
            self._panels_waiting()  # a clicked cell's panel need not wait for the whole grid
            frame = self.score(superscopes.run(model, chunk, remote=job.remote, progress=False, threads=None))
            frame["model"] = job.model
            frame = flag_echoes(frame, target=job.grid["target"])  # the one echo rule (judge.score's)
            frame["control"] = frame["transform"].map(CONTROL_OF) if control else ""
            columns = [*ROW_COLUMNS, "control"] if control else ROW_COLUMNS
            rows = [
                {k: _finite(v.item() if hasattr(v, "item") else v) for k, v in zip(columns, values)}
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

    def _controls(self, job: Job, model) -> None:
        """The second phase: each best readout's controls, in sub-grids of one source token and a
        few layers (a ``where`` filter keeps only the controls' cells); those the grid holds are
        copied, not run again."""
        from superscopes import Scope

        with job.lock:
            rows = list(job.rows)
        alphas = job.grid["alphas"]
        reused = reused_controls(job.grid["transform"], alphas)
        by_cell = {(r["position"], r["site"], r["layer"], r["alpha"]): r for r in rows}
        wanted: dict[int, set] = {}
        copies = []
        for (position, site, layer), row in best_rows(rows).items():
            for name, (transform, alpha) in CONTROLS.items():
                alpha = row["alpha"] if alpha is None else alpha
                if name in reused:
                    copies.append(by_cell[(position, site, layer, alpha)] | {"control": name})
                else:
                    wanted.setdefault(position, set()).add((site, layer, transform, alpha))
        per_cell = len(job.grid["sites"]) * (len(CONTROLS) - len(reused))
        step = max(1, self.chunk_rows // max(per_cell, 1))
        chunks = []
        for position, cells in wanted.items():
            layers = sorted({layer for _, layer, _, _ in cells})
            for i in range(0, len(layers), step):
                chunks.append((position, Scope(
                    job.prompt, position=position, layers=layers[i : i + step],
                    **(job.common | {"alphas": sorted({a for *_, a in cells}),
                                     "transforms": sorted({t for _, _, t, _ in cells})}),
                    where=lambda c, keep=frozenset(cells): (c.site, c.layer, c.transform, c.alpha) in keep,
                )))  # fmt: skip
        with job.lock:
            job.controls.extend(copies)
            job.controls_total = sum(len(cells) for cells in wanted.values())  # rows without a score have none
            job.chunks = chunks
        self._chunks(job, model, control=True)

    def csv(self, job_id: str) -> tuple[str, bytes]:
        with self.jobs_lock:
            job = self.jobs.get(check_run_id(job_id))
        kind = job.kind if job is not None else self._kept(job_id).get("kind", "grid")
        if kind != "grid":
            raise NotFound(f"run {job_id!r} is a {kind} panel job: only grids have a CSV")
        if job is not None:
            prompt, data = job.prompt, csv_safe(job.frame()).to_csv(index=False).encode()
        else:
            kept = self._kept(job_id)
            try:
                prompt, data = kept["prompt"], self.store.csv(job_id)
            except RunStoreError as error:
                raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, str(error)) from None
            if data is None and kept.get("dropped"):
                raise NotFound(f"run {job_id!r} was too large to keep its results: run it again for a CSV")
            if data is None:
                raise NotFound(f"run {job_id!r} stopped before any of its cells finished: it has no CSV")
        return f"superscopes-{_slug(prompt)}-{job_id}.csv", data


class _WithTokenizer:
    """``model`` as ``plan`` sees it, with another tokenizer (the request path's private copy)."""

    def __init__(self, model, tokenizer):
        self._model, self.tokenizer = model, tokenizer

    def __getattr__(self, name: str):
        return getattr(self._model, name)


# ---------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    server_version = "superscopes-app"
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT  # a client that stalls (or idles on keep-alive) frees its thread

    @property
    def app(self) -> App:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if getattr(self.server, "verbose", False):
            sys.stderr.write(redact(f"{self.address_string()} - - [{self.log_date_time_string()}] {format % args}\n"))

    # ------------------------------------------------------------ replies

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload, allow_nan=False).encode(), "application/json; charset=utf-8")

    def _error(self, status: int, message: str, **extra) -> None:
        self._json(status, {"error": message, **extra})

    def _host_ok(self) -> bool:
        """On a loopback bind, only loopback Host headers (no DNS rebinding from web pages)."""
        if not getattr(self.server, "loopback", True):
            return True
        host = (self.headers.get("Host") or "").strip()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower()
        if name == "localhost":
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    def _read(self) -> None:
        """Read the request body now, so that an early error reply leaves the connection clean."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if self.headers.get("Transfer-Encoding") is not None:
            length = -1  # refused by _dispatch, and never read
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            self.raw_body = None
        else:
            self.raw_body = self.rfile.read(length) if length else b""

    def _body(self) -> dict:
        return parse_body(getattr(self, "raw_body", b""), self.headers.get("Content-Type") or "")

    def _dispatch(self, routes: dict) -> None:
        if self.headers.get("Transfer-Encoding") is not None:
            # Not read here: its bytes would be parsed as a second request on this connection.
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "send the request body with a Content-Length, not chunked")
            return
        if not self._host_ok():
            self._error(HTTPStatus.FORBIDDEN, "this server only answers requests addressed to localhost")
            return
        if self.command == "POST":  # a page on another site (or port) must not start or cancel jobs
            why = cross_site(self.headers.get("Origin"), self.headers.get("Sec-Fetch-Site"),
                             self.headers.get("Host") or "")
            if why:
                self._error(HTTPStatus.FORBIDDEN, f"refused a request from another site: {why}")
                return
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        for pattern, handler in routes.items():
            found = re.fullmatch(pattern, url.path)
            if found:
                break
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such page or endpoint: {url.path}")
            return
        try:
            handler(query, *found.groups())
        except Busy as busy:
            self._error(HTTPStatus.CONFLICT, str(busy), job=busy.job_id)
        except Refused as refused:
            self._error(refused.status, str(refused))
        except NotFound as error:
            self._error(HTTPStatus.NOT_FOUND, str(error))
        except ValueError as error:  # BadRequest, ScopeError, ModelNotFoundError: the input's fault
            self._error(HTTPStatus.BAD_REQUEST, _error_text(error))
        except Exception as error:  # a server-side failure: one line for the page, the traceback on the terminal
            _log_error(error)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"server error: {_error_text(error)}")

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._dispatch({
            r"/": lambda q: self._static("index.html"),
            r"/static/([A-Za-z0-9_.-]+)": lambda q, name: self._static(name),
            r"/favicon\.ico": lambda q: self._static("favicon.svg"),
            r"/api/config": lambda q: self._json(200, self.app.config(q.get("client"))),
            r"/api/jobs/([^/]*)": self._state,  # ids are checked by the app (check_run_id)
            r"/api/jobs/([^/]*)/csv": self._csv,
            r"/api/runs": lambda q: self._json(200, self.app.runs(parse_whole(q.get("limit", 20), "limit", 1, MAX_HISTORY))),
        })  # fmt: skip

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        self._read()
        self._dispatch({
            r"/api/tokens": lambda q: self._json(200, self.app.tokens(self._body())),
            r"/api/run": self._run,
            r"/api/jobs/([^/]*)/cancel": self._cancel,
            r"/api/jobs/([^/]*)/focus": lambda q, job: self._json(200, self.app.focus(job, self._body())),
            r"/api/cell": lambda q: self._json(202, self.app.start_panel(self.app.prepare_cell(self._body()))),
            r"/api/latent": lambda q: self._json(202, self.app.start_panel(self.app.prepare_latent(self._body()))),
        })  # fmt: skip

    def _state(self, query: dict, job_id: str) -> None:
        since = parse_whole(query.get("since", 0), "since", 0, 10**9)
        controls_since = parse_whole(query.get("controls_since", 0), "controls_since", 0, 10**9)
        self._json(200, self.app.state(job_id, since, controls_since))

    def _static(self, name: str) -> None:
        path = STATIC / name
        if path.suffix not in STATIC_TYPES or not path.is_file():
            raise NotFound(f"no static file {name!r}")
        self._send(200, path.read_bytes(), STATIC_TYPES[path.suffix] + "; charset=utf-8")

    def _run(self, query: dict) -> None:
        self._json(202, self.app.start(self._body()))

    def _cancel(self, query: dict, job_id: str) -> None:
        self._body()  # a JSON POST only: a plain form on another site cannot cancel
        self._json(200, self.app.cancel(job_id))

    def _csv(self, query: dict, job_id: str) -> None:
        filename, data = self.app.csv(job_id)
        self._send(200, data, "text/csv; charset=utf-8",
                   {"Content-Disposition": f'attachment; filename="{filename}"'})  # fmt: skip


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, app: App, verbose: bool = False):
        self.app = app
        self.verbose = verbose
        host = address[0]
        try:
            self.loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            self.loopback = False
        super().__init__(address, Handler)

    def handle_error(self, request, client_address) -> None:
        """An error outside a handler's own catch (a dropped connection...): redacted, one traceback."""
        _log_error(sys.exc_info()[1])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host if ':' not in host else f'[{host}]'}:{port}/"


def make_server(app: App | None = None, host: str = "127.0.0.1", port: int = 8765, verbose: bool = False) -> Server:
    """A bound, not yet serving, server (``port=0``: any free port; see ``server.url``)."""
    return Server((host, port), app or App(), verbose=verbose)


def serve(model=DEFAULT_MODEL, host: str = "127.0.0.1", port: int = 8765, remote_models: list[str] | None = None,
          max_cells: int | None = None, verbose: bool = False, store: str | Path | None = None,
          saes: list[str] | None = None, generators: list[str] | None = None,
          corpora: list[str] | None = None) -> int:  # fmt: skip
    """Serve the page until Ctrl-C. ``model``: the name selected when the page opens (loaded
    on first use), or an already-loaded nnsight model (offered as ``"model"``). ``store``: the
    SQLite file that keeps runs (default ``$SUPERSCOPES_CACHE/app/runs.sqlite``). ``saes``,
    ``generators``, ``corpora``: SAE folders, InverseScope generators and corpora of pairs for
    the cell panels (the embedded SAEs are always offered)."""
    from superscopes.app.store import default_path

    limits = {"max_cells": max_cells} if max_cells else None
    try:
        runs = RunStore(store or default_path())
    except (OSError, sqlite3.Error) as error:
        print(f"superscopes: error: cannot keep runs in {store or default_path()}: {error}", file=sys.stderr)
        return 2
    panels = {"saes": saes or (), "generators": generators or (), "corpora": corpora or ()}
    try:
        if isinstance(model, str):
            app = App(default_model=model, remote_models=remote_models, limits=limits, store=runs, **panels)
        else:
            app = App(default_model="model", models={"model": model}, remote_models=remote_models, limits=limits,
                      store=runs, **panels)  # fmt: skip
    except (OSError, ValueError) as error:  # an SAE, generator or corpus that cannot be read
        print(f"superscopes: error: {error}", file=sys.stderr)
        return 2
    try:
        server = make_server(app, host, port, verbose)
    except OSError as error:
        print(f"superscopes: error: cannot listen on {host}:{port}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(f"superscopes app: serving on {server.url}  (Ctrl-C to stop; runs kept in {runs.path})", flush=True)
    if not server.loopback:
        print(f"superscopes app: warning: bound to {host}: anyone who can reach it can run models here", flush=True)
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        print("superscopes app: stopped", flush=True)
    finally:
        server.server_close()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``superscopes app`` options (for a sub-command parser)."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model selected when the page opens; loaded on first use (default {DEFAULT_MODEL})")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    parser.add_argument("--remote-models", default="",
                        help="comma list of models offered on NDIF when NDIF_API_KEY or NDIF_HOST is set (default: the embedded ones)")
    parser.add_argument("--max-cells", type=int, default=LIMITS["max_cells"], help="cap on cells per run")
    parser.add_argument("--store", default=None,
                        help="SQLite file that keeps runs across restarts (default $SUPERSCOPES_CACHE/app/runs.sqlite)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    parser.add_argument("--sae", action="append", default=[], metavar="FOLDER",
                        help="an SAE (SAELens folder) for the cell's SAE breakdown; repeatable (the embedded SAEs are always offered)")
    parser.add_argument("--generator", action="append", default=[], metavar="PATH",
                        help="a trained InverseScope generator (generator.pt or its folder, whose pairs.pt is offered as a corpus); repeatable")
    parser.add_argument("--corpus", action="append", default=[], metavar="PATH",
                        help="a corpus of (input, activation) pairs (pairs.pt or its folder) for the nearest-corpus inputs; repeatable")
    return parser  # fmt: skip


def cmd_app(args: argparse.Namespace) -> int:
    remote = [m for m in args.remote_models.split(",") if m] or None
    return serve(args.model, args.host, args.port, remote, args.max_cells, args.verbose, args.store,
                 args.sae, args.generator, args.corpus)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """``superscopes app [--model NAME] [--port N] [--host 127.0.0.1]``: its --help shows every
    default, as the ``superscopes app`` verb's does (the same ``CommandParser``)."""
    from superscopes.parsing import CommandParser

    parser = add_arguments(CommandParser(prog="superscopes app", description="serve the Superscopes page"))
    return cmd_app(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
