"""HTTP: the routes, the origin and host checks, the replies; errors map to statuses here.

Endpoints (all JSON unless stated; POSTs take only same-origin ``application/json``)::

    GET  /                      the page;  GET /static/<file>
    GET  /api/config            models, limits, defaults, templates, readouts, the client's active job
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

``GET /api/jobs/<id>`` serves panel jobs with ``kind`` and ``result``.
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from superscopes.app.errors import Busy, NotFound, Refused, error_text, log_error, redact, show
from superscopes.app.fields import parse_whole
from superscopes.app.request import MAX_BODY, parse_body

if TYPE_CHECKING:
    from superscopes.app.api import App

STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
MAX_HISTORY = 100  # runs one history request lists
SOCKET_TIMEOUT = 30  # seconds a connection may stall mid-request before its thread is freed
LISTEN_BACKLOG = 128  # connections the kernel holds while every handler thread is busy starting


def cross_site(origin: str | None, fetch_site: str | None, host: str) -> str | None:
    """Why a POST comes from a page on another origin (another site, or another port of this
    machine), or None. Scripts send neither header; browsers send at least one."""
    if fetch_site is not None and fetch_site.strip().lower() not in ("same-origin", "none"):
        return f"Sec-Fetch-Site is {show(fetch_site)}"
    if origin is not None and origin.strip().lower() != f"http://{host.strip().lower()}":
        return f"Origin {show(origin)} is not this server's"
    return None


def loopback_host(host: str) -> bool:
    """Whether a Host header names this machine's loopback (``localhost``, ``127.0.0.1:8765``, ``[::1]``)."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Handler(BaseHTTPRequestHandler):
    """One request: refused (host, origin, chunked body), routed to the app, answered as JSON."""

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
        return loopback_host((self.headers.get("Host") or "").strip())

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

    def _refusal(self) -> tuple[int, str] | None:
        """Why this request is refused before it is routed, or None."""
        if self.headers.get("Transfer-Encoding") is not None:
            # Not read here: its bytes would be parsed as a second request on this connection.
            self.close_connection = True
            return HTTPStatus.LENGTH_REQUIRED, "send the request body with a Content-Length, not chunked"
        if not self._host_ok():
            return HTTPStatus.FORBIDDEN, "this server only answers requests addressed to localhost"
        if self.command == "POST":  # a page on another site (or port) must not start or cancel jobs
            headers = self.headers
            why = cross_site(headers.get("Origin"), headers.get("Sec-Fetch-Site"), headers.get("Host") or "")
            if why:
                return HTTPStatus.FORBIDDEN, f"refused a request from another site: {why}"
        return None

    def _dispatch(self, routes: dict[str, Callable[..., None]]) -> None:
        refusal = self._refusal()
        if refusal is not None:
            self._error(*refusal)
            return
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        matches = ((handler, re.fullmatch(pattern, url.path)) for pattern, handler in routes.items())
        handler, found = next(((h, f) for h, f in matches if f), (None, None))
        if handler is None:
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
            self._error(HTTPStatus.BAD_REQUEST, error_text(error))
        except Exception as error:  # a server-side failure: one line for the page, the traceback on the terminal
            log_error(error)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"server error: {error_text(error)}")

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        routes = {
            r"/": lambda q: self._static("index.html"),
            r"/static/([A-Za-z0-9_.-]+)": lambda q, name: self._static(name),
            r"/favicon\.ico": lambda q: self._static("favicon.svg"),
            r"/api/config": lambda q: self._json(200, self.app.config(q.get("client"))),
            r"/api/jobs/([^/]*)": self._state,  # ids are checked by the app (check_run_id)
            r"/api/jobs/([^/]*)/csv": self._csv,
            r"/api/runs": self._runs,
        }
        self._dispatch(routes)

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        self._read()
        routes = {
            r"/api/tokens": lambda q: self._json(200, self.app.tokens(self._body())),
            r"/api/run": self._run,
            r"/api/jobs/([^/]*)/cancel": self._cancel,
            r"/api/jobs/([^/]*)/focus": lambda q, job: self._json(200, self.app.focus(job, self._body())),
            r"/api/cell": lambda q: self._json(202, self.app.start_panel(self.app.prepare_cell(self._body()))),
            r"/api/latent": lambda q: self._json(202, self.app.start_panel(self.app.prepare_latent(self._body()))),
        }
        self._dispatch(routes)

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

    def _runs(self, query: dict) -> None:
        self._json(200, self.app.runs(parse_whole(query.get("limit", 20), "limit", 1, MAX_HISTORY)))

    def _csv(self, query: dict, job_id: str) -> None:
        filename, data = self.app.csv(job_id)
        self._send(200, data, "text/csv; charset=utf-8", {"Content-Disposition": f'attachment; filename="{filename}"'})


class Server(ThreadingHTTPServer):
    """A thread per connection; ``loopback``: bound to this machine only, so Host is checked."""

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
        log_error(sys.exc_info()[1])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host if ':' not in host else f'[{host}]'}:{port}/"
