"""The Superscopes web app: a JSON API on the standard library's ``ThreadingHTTPServer``.

The page (``static/``) sends a grid; the server validates it with the core's ``plan`` (no
forward pass), then runs it as a background job in chunks: each chunk is one
``superscopes.run`` call on a sub-grid (one source token x a few layers, every site and
alpha), followed by the judge. Between chunks the job publishes its rows (progress and
partial results) and checks for cancellation. One job at a time per page (client id);
model passes of all jobs share one lock. Models load lazily and stay cached.

Endpoints (all JSON unless stated)::

    GET  /                      the page;  GET /static/<file>
    GET  /api/config            models, limits, defaults, templates, the client's running job
    POST /api/tokens            {model, prompt} -> the prompt's tokens and the model's layers
    POST /api/run               a grid -> {job, total, ...} or {error} (400, 409)
    GET  /api/jobs/<id>?since=N status, counts and the rows from N on
    POST /api/jobs/<id>/cancel  stop after the chunk in progress
    GET  /api/jobs/<id>/csv     the results so far as CSV (attachment)
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import re
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pandas as pd

from superscopes.models import DEFAULT_MODEL, EMBEDDED

STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}

LIMITS = {
    "max_cells": 2000,  # cells per run (tokens x sites x layers x alphas)
    "max_prompt_chars": 300,
    "max_prompt_tokens": 48,
    "max_template_chars": 1000,
    "max_new_tokens": 32,
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
}
ROW_COLUMNS = ["token", "position", "site", "layer", "target_layer", "alpha", "output", "similarity"]
REMOTE_PREFIX = "ndif:"
MAX_BODY = 64 * 1024
KEEP_JOBS = 32


class BadRequest(ValueError):
    """Input the page should show as it is (HTTP 400)."""


class NotFound(LookupError):
    """An unknown job or file (HTTP 404)."""


class Busy(Exception):
    def __init__(self, job_id: str):
        super().__init__("a run is already in progress on this page: wait for it to finish or cancel it")
        self.job_id = job_id


def _redact(text: str) -> str:
    from superscopes.remote import redact

    return redact(text)


def _error_text(error: BaseException) -> str:
    """One line for the page: the message of expected errors, the type for unexpected ones."""
    from superscopes.models import FetchError

    if isinstance(error, KeyError) and error.args:
        message = str(error.args[0])
    elif isinstance(error, (ValueError, FetchError, OSError)):
        message = str(error)
    else:
        message = f"{type(error).__name__}: {error}"
    return _redact(message or type(error).__name__)


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _unique(values: list) -> list:
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------- request parsing


def _text(body: dict, name: str, default: str = "") -> str:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be text, got {value!r}")
    return value


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


def parse_alphas(value) -> list[float]:
    if isinstance(value, list):
        items = value
    else:
        items = [x for x in str(value if value is not None else "").replace(" ", "").split(",") if x]
    if not items:
        raise BadRequest("alphas is empty: give numbers such as 1,3,6,9,12,15")
    alphas = []
    for item in items:
        try:
            alphas.append(float(item))
        except (TypeError, ValueError):
            raise BadRequest(f"alpha {item!r} is not a number") from None
    return alphas


def parse_target_layer(value) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value if value is not None else "").strip()
    if text == "same":
        return "same"
    try:
        return int(text)
    except ValueError:
        raise BadRequest(f"target layer {text!r}: use 0, same, or a layer number") from None


# ---------------------------------------------------------------- jobs


@dataclass
class Job:
    id: str
    client: str
    model: str
    prompt: str
    total: int
    grid: dict  # what the page needs to lay out tables and heatmaps
    chunks: list  # sub-grid Scopes, run in order
    remote: bool = False
    status: str = "running"  # running | done | cancelled | error
    done: int = 0
    error: str | None = None
    rows: list[dict] = field(default_factory=list)
    frames: list[pd.DataFrame] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def state(self, since: int = 0) -> dict:
        with self.lock:
            since = max(0, min(since, len(self.rows)))
            return {
                "job": self.id,
                "status": self.status,
                "done": self.done,
                "total": self.total,
                "error": self.error,
                "model": self.model,
                "prompt": self.prompt,
                "grid": self.grid,
                "rows": self.rows[since:],
                "next": len(self.rows),
                "elapsed": round((self.finished or time.time()) - self.started, 1),
            }

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
        self.jobs: dict[str, Job] = {}
        self.jobs_lock = threading.Lock()
        self.compute_lock = threading.Lock()  # one model pass at a time, across jobs
        self.load_locks: dict[str, threading.Lock] = {}
        self.tokenizers: dict[int, tuple] = {}  # id(model) -> (model, tokenizer copy)
        self.tokenizer_lock = threading.Lock()

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
        }

    def tokens(self, body: dict) -> dict:
        from superscopes.sites import num_layers

        name = _text(body, "model", self.default_model) or self.default_model
        prompt = _text(body, "prompt")
        self._check_prompt_length(prompt)
        model = self.model(name)
        return {
            "model": name,
            "prompt": prompt,
            "tokens": self._tokens(model, prompt) if prompt else [],
            "num_layers": num_layers(model),
        }

    def _check_prompt_length(self, prompt: str) -> None:
        cap = self.limits["max_prompt_chars"]
        if len(prompt) > cap:
            raise BadRequest(f"the prompt has {len(prompt)} characters; this page takes at most {cap}")

    def _tokens(self, model, prompt: str) -> list[dict]:
        """The prompt's tokens, with a private copy of the tokenizer: a fast tokenizer used
        from two threads at once (this request and a job's batched pass) can fail."""
        import copy

        from superscopes.prompts import tokens

        with self.tokenizer_lock:
            key = id(model)
            if key not in self.tokenizers:
                self.tokenizers[key] = (model, copy.deepcopy(model.tokenizer))
            tokenizer = self.tokenizers[key][1]
            ids = tokenizer(prompt)["input_ids"]
            special = set(tokenizer.all_special_ids)
            texts = tokens(tokenizer, prompt)
        return [
            {"index": i, "text": text, "special": token_id in special}
            for i, (token_id, text) in enumerate(zip(ids, texts))
        ]

    def active_job(self, client: str) -> Job | None:
        with self.jobs_lock:
            for job in self.jobs.values():
                if job.client == client and job.status == "running":
                    return job
        return None

    def job(self, job_id: str) -> Job:
        with self.jobs_lock:
            job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} on this server (it may have been dropped after a restart)")
        return job

    def prepare(self, body: dict) -> Job:
        """Validate a grid (the core's ``plan``, then this page's caps) and cut it into chunks."""
        from superscopes import Scope
        from superscopes.scope import plan

        client = _text(body, "client") or "anonymous"
        name = _text(body, "model", self.default_model) or self.default_model
        prompt = _text(body, "prompt")
        if not prompt.strip():
            raise BadRequest("the prompt is empty: type the text whose tokens you want to scope")
        self._check_prompt_length(prompt)
        mode = _text(body, "tokens", "all")
        if mode not in ("all", "last", "match"):
            raise BadRequest(f"tokens {mode!r}: choose all, last or match")
        match = _text(body, "token")
        if mode == "match" and not match:
            raise BadRequest("type the token to scope (a piece of the prompt), or choose all or last tokens")
        layers = parse_layers(body.get("layers", DEFAULTS["layers"]))
        target_layer = parse_target_layer(body.get("target_layer", DEFAULTS["target_layer"]))
        sites = body.get("sites", DEFAULTS["sites"])
        if isinstance(sites, str):
            sites = [s for s in sites.split(",") if s]
        if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
            raise BadRequest(f"sites must be a list of site names, got {sites!r}")
        if not sites:
            raise BadRequest(f"pick at least one site ({', '.join(SITES.values())})")
        alphas = sorted(_unique(parse_alphas(body.get("alphas", DEFAULTS["alphas"]))))
        transform = _text(body, "transform", "scale")
        if transform not in TRANSFORMS:
            raise BadRequest(f"transform {transform!r} is not offered here; choose {', '.join(TRANSFORMS)}")
        target_kind = _text(body, "target", "entity")
        placeholder = None
        if target_kind == "custom":
            target = _text(body, "template")
            placeholder = _text(body, "placeholder", "x") or "x"
            if not target.strip():
                raise BadRequest("the custom target template is empty: write a prompt containing the placeholder")
            if len(target) > self.limits["max_template_chars"]:
                raise BadRequest(f"the target template is longer than {self.limits['max_template_chars']} characters")
        elif target_kind in ("entity", "identity"):
            target = target_kind
        else:
            raise BadRequest(f"target {target_kind!r}: choose entity, identity or custom")
        try:
            max_new_tokens = int(body.get("max_new_tokens", DEFAULTS["max_new_tokens"]))
        except (TypeError, ValueError):
            raise BadRequest(f"new tokens {body.get('max_new_tokens')!r} is not a whole number") from None
        if not 1 <= max_new_tokens <= self.limits["max_new_tokens"]:
            raise BadRequest(f"new tokens must be between 1 and {self.limits['max_new_tokens']}, got {max_new_tokens}")

        running = self.active_job(client)
        if running is not None:
            raise Busy(running.id)
        model = self.model(name)

        common = dict(
            sites=_unique(sites), alphas=alphas, transforms=[transform], target=target, placeholder=placeholder,
            target_layers=[target_layer], max_new_tokens=max_new_tokens, batch_size=self.batch_size,
        )  # fmt: skip
        where = {"all": {"all_tokens": True}, "last": {"position": -1}, "match": {"token": match}}[mode]
        full = Scope(prompt, layers=layers if layers == "all" else sorted(_unique(layers)), **where, **common)
        full.max_cells = 10**9  # this page's own cap is checked below, on the tokens it runs
        with self.compute_lock:  # plan tokenises with the model's tokenizer, which jobs use too
            the_plan = plan(full, model)  # raises ScopeError with the core's message

        pieces = self._tokens(model, prompt)
        if len(pieces) > self.limits["max_prompt_tokens"]:
            raise BadRequest(
                f"the prompt has {len(pieces)} tokens; this page takes at most {self.limits['max_prompt_tokens']}"
            )
        positions = [s.position for s in the_plan.sources]
        if mode == "all":
            positions = [p for p in positions if not pieces[p]["special"]]
            if not positions:
                raise BadRequest("the prompt has only special tokens: type some text")
        layer_list = _unique(c.layer for c in the_plan.cells)
        n_cells = len(positions) * len(full.sites) * len(layer_list) * len(alphas)
        if n_cells > self.limits["max_cells"]:
            raise BadRequest(
                f"the grid has {n_cells} cells ({len(positions)} tokens x {len(full.sites)} sites x "
                f"{len(layer_list)} layers x {len(alphas)} alphas), over this page's cap of "
                f"{self.limits['max_cells']}: choose fewer tokens, layers, sites or alphas"
            )

        # Chunks: a few layers of one source token, every site and alpha; layer groups
        # outermost so that every token fills in from its first layers on.
        per_layer = len(full.sites) * len(alphas)
        step = max(1, self.chunk_rows // per_layer)
        chunks = [
            Scope(prompt, position=p, layers=layer_list[i : i + step], **common)
            for i in range(0, len(layer_list), step)
            for p in positions
        ]
        grid = {
            "tokens": pieces,
            "positions": positions,
            "sites": full.sites,
            "layers": layer_list,
            "alphas": alphas,
            "transform": transform,
            "target_layer": target_layer,
            "target": the_plan.target_text,
            "threshold": self.threshold,
        }
        return Job(
            id=uuid.uuid4().hex[:12], client=client, model=name, prompt=prompt, total=n_cells, grid=grid,
            chunks=chunks, remote=name.startswith(REMOTE_PREFIX),
        )  # fmt: skip

    def start(self, body: dict) -> Job:
        job = self.prepare(body)
        with self.jobs_lock:
            running = [j for j in self.jobs.values() if j.client == job.client and j.status == "running"]
            if running:
                raise Busy(running[0].id)
            self.jobs[job.id] = job
            finished = [j for j in self.jobs.values() if j.status != "running"]
            for old in sorted(finished, key=lambda j: j.started)[: max(0, len(self.jobs) - KEEP_JOBS)]:
                del self.jobs[old.id]
        threading.Thread(target=self._work, args=(job,), name=f"superscopes-job-{job.id}", daemon=True).start()
        return job

    def _work(self, job: Job) -> None:
        import superscopes

        try:
            model = self.model(job.model)
            if job.remote:  # the page shows progress; keep nnsight's per-request spinner off the terminal
                from nnsight import CONFIG

                CONFIG.APP.REMOTE_LOGGING = False
            for chunk in job.chunks:
                if job.cancel.is_set():
                    break
                with self.compute_lock:
                    if job.cancel.is_set():
                        break
                    frame = superscopes.run(model, chunk, remote=job.remote, progress=False)
                    frame = self.score(frame)
                frame["model"] = job.model
                rows = [
                    {k: _finite(v.item() if hasattr(v, "item") else v) for k, v in zip(ROW_COLUMNS, values)}
                    for values in frame[ROW_COLUMNS].itertuples(index=False)
                ]
                with job.lock:
                    job.frames.append(frame)
                    job.rows.extend(rows)
                    job.done += len(rows)
            status, error = ("cancelled" if job.done < job.total else "done"), None
        except Exception as exc:  # reported to the page; the traceback goes to the terminal
            traceback.print_exc(file=sys.stderr)
            status, error = "error", _error_text(exc)
        with job.lock:
            job.status, job.error, job.finished = status, error, time.time()

    def csv(self, job_id: str) -> tuple[str, bytes]:
        job = self.job(job_id)
        frame = job.frame()
        return f"superscopes-{_slug(job.prompt)}-{job.id}.csv", frame.to_csv(index=False).encode()


# ---------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    server_version = "superscopes-app"
    protocol_version = "HTTP/1.1"

    @property
    def app(self) -> App:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

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
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            self.raw_body = None
        else:
            self.raw_body = self.rfile.read(length) if length else b""

    def _body(self) -> dict:
        raw = getattr(self, "raw_body", b"")
        if raw is None:
            raise BadRequest(f"the request body is missing its length or is over {MAX_BODY} bytes")
        if "json" not in (self.headers.get("Content-Type") or ""):
            raise BadRequest("send the request as application/json")
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as error:
            raise BadRequest(f"the request is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise BadRequest("the request must be a JSON object")
        return body

    def _dispatch(self, routes: dict) -> None:
        if not self._host_ok():
            self._error(HTTPStatus.FORBIDDEN, "this server only answers requests addressed to localhost")
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
        except NotFound as error:
            self._error(HTTPStatus.NOT_FOUND, str(error))
        except ValueError as error:  # BadRequest, ScopeError, ModelNotFoundError: the input's fault
            self._error(HTTPStatus.BAD_REQUEST, _error_text(error))
        except Exception as error:  # a server-side failure, shown in the page
            traceback.print_exc(file=sys.stderr)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"server error: {_error_text(error)}")

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._dispatch({
            r"/": lambda q: self._static("index.html"),
            r"/static/([A-Za-z0-9_.-]+)": lambda q, name: self._static(name),
            r"/favicon\.ico": lambda q: self._static("favicon.svg"),
            r"/api/config": lambda q: self._json(200, self.app.config(q.get("client"))),
            r"/api/jobs/([0-9a-f]+)": lambda q, job: self._json(200, self.app.job(job).state(int(q.get("since") or 0))),
            r"/api/jobs/([0-9a-f]+)/csv": self._csv,
        })  # fmt: skip

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        self._read()
        self._dispatch({
            r"/api/tokens": lambda q: self._json(200, self.app.tokens(self._body())),
            r"/api/run": self._run,
            r"/api/jobs/([0-9a-f]+)/cancel": self._cancel,
        })  # fmt: skip

    def _static(self, name: str) -> None:
        path = STATIC / name
        if path.suffix not in STATIC_TYPES or not path.is_file():
            raise NotFound(f"no static file {name!r}")
        self._send(200, path.read_bytes(), STATIC_TYPES[path.suffix] + "; charset=utf-8")

    def _run(self, query: dict) -> None:
        job = self.app.start(self._body())
        self._json(202, job.state())

    def _cancel(self, query: dict, job_id: str) -> None:
        self._body()  # a JSON POST only: a plain form on another site cannot cancel
        job = self.app.job(job_id)
        job.cancel.set()
        self._json(200, job.state(len(job.rows)) | {"rows": []})

    def _csv(self, query: dict, job_id: str) -> None:
        filename, data = self.app.csv(job_id)
        self._send(200, data, "text/csv; charset=utf-8",
                   {"Content-Disposition": f'attachment; filename="{filename}"'})  # fmt: skip


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, app: App, verbose: bool = False):
        self.app = app
        self.verbose = verbose
        host = address[0]
        try:
            self.loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            self.loopback = False
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host if ':' not in host else f'[{host}]'}:{port}/"


def make_server(app: App | None = None, host: str = "127.0.0.1", port: int = 8765, verbose: bool = False) -> Server:
    """A bound, not yet serving, server (``port=0``: any free port; see ``server.url``)."""
    return Server((host, port), app or App(), verbose=verbose)


def serve(model=DEFAULT_MODEL, host: str = "127.0.0.1", port: int = 8765, remote_models: list[str] | None = None,
          max_cells: int | None = None, verbose: bool = False) -> int:  # fmt: skip
    """Serve the page until Ctrl-C. ``model``: the name selected when the page opens (loaded
    on first use), or an already-loaded nnsight model (offered as ``"model"``)."""
    if isinstance(model, str):
        app = App(default_model=model, remote_models=remote_models, limits={"max_cells": max_cells} if max_cells else None)
    else:
        app = App(default_model="model", models={"model": model}, remote_models=remote_models,
                  limits={"max_cells": max_cells} if max_cells else None)  # fmt: skip
    try:
        server = make_server(app, host, port, verbose)
    except OSError as error:
        print(f"superscopes: error: cannot listen on {host}:{port}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(f"superscopes app: serving on {server.url}  (Ctrl-C to stop)", flush=True)
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
    parser.add_argument("--verbose", action="store_true", help="log every request")
    return parser  # fmt: skip


def cmd_app(args: argparse.Namespace) -> int:
    remote = [m for m in args.remote_models.split(",") if m] or None
    return serve(args.model, args.host, args.port, remote, args.max_cells, args.verbose)


def main(argv: list[str] | None = None) -> int:
    """``superscopes app [--model NAME] [--port N] [--host 127.0.0.1]``."""
    parser = add_arguments(argparse.ArgumentParser(prog="superscopes app", description="serve the Superscopes page"))
    return cmd_app(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
