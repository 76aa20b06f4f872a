"""NDIF configuration: host and API key from the environment or a ``.env`` file.

The key is handed to nnsight's config and nowhere else: it is never printed, saved in
results or included in error messages (``redact`` scrubs it, and nnsight's own key from its
config file, from any text we show, and ``explain`` from the exceptions it chains to).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from superscopes.env import read_dotenv, value  # noqa: F401 (read_dotenv: its old home, kept importable)

if TYPE_CHECKING:
    from superscopes.models import Model

ENV_VARS = ("NDIF_API_KEY", "NDIF_HOST")


def settings(dotenv: Path | None = None) -> dict[str, str | None]:
    """NDIF settings: the process environment wins over ``.env`` (default: ./.env)."""
    return {name: value(name, dotenv) for name in ENV_VARS}


class RemoteConfigError(ValueError):
    """NDIF_HOST or NDIF_API_KEY cannot be used as given; nothing was sent."""


def configure(dotenv: Path | None = None, ship: tuple[ModuleType, ...] = ()) -> None:
    """Point nnsight at the configured NDIF host and key, and ship our trace code by value:
    the snippets (``ops``, ``sites``) and the modules in ``ship`` (the graph passes itself, so
    this module does not import it)."""
    from nnsight import CONFIG

    values = settings(dotenv)
    if values["NDIF_HOST"]:
        CONFIG.API.HOST = values["NDIF_HOST"]
    if values["NDIF_API_KEY"]:
        CONFIG.API.APIKEY = values["NDIF_API_KEY"]
    host = CONFIG.API.HOST or ""
    if not host.startswith(("http://", "https://")):
        source = "NDIF_HOST" if values["NDIF_HOST"] else "the host in nnsight's config"
        raise RemoteConfigError(
            f"{source} {host!r} has no scheme: write it as http://{host} (a local server) or https://{host}"
        )
    send_by_value(*ship)


def send_by_value(*modules: ModuleType) -> None:
    """Send our trace code by value with nnsight requests (remote and ``remote="local"``): the
    server does not have superscopes installed. ``ops`` and ``sites`` always, plus ``modules``."""
    import nnsight

    from superscopes import ops, sites

    for module in (ops, sites, *modules):
        nnsight.register(module)


_SHORTEST_SECRET = 4  # a shorter "key" (e.g. "x" for a server without key checks) hides nothing


def _secrets() -> set[str]:
    """Every API key nnsight may send: ours (environment, .env) and nnsight's own (its
    config file or NDIF_API_KEY as nnsight read it), once nnsight is imported; and the
    Hugging Face token."""
    keys = {settings()["NDIF_API_KEY"], value("HF_TOKEN")}
    if "nnsight" in sys.modules:
        from nnsight import CONFIG

        keys.add(CONFIG.API.APIKEY)
    return {k for k in keys if k and len(k) >= _SHORTEST_SECRET}


def redact(text: str) -> str:
    """``text`` with every API key nnsight may use replaced by ``***``."""
    for key in sorted(_secrets(), key=len, reverse=True):
        text = text.replace(key, "***")
    return text


class RemoteRunError(RuntimeError):
    """A remote run failed; the message says what happened and what to do."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or while handling."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _scrub(error: BaseException) -> None:
    """Remove API keys from the messages of ``error``'s chain, in place: a caller's
    ``raise ... from error`` then prints no key in the chained traceback."""
    for link in _chain(error):
        link.args = tuple(redact(a) if isinstance(a, str) else a for a in link.args)
        if hasattr(link, "__notes__"):
            link.__notes__ = [redact(n) for n in link.__notes__]


def _http_status(error: BaseException) -> int | None:
    """The HTTP status of the first refusal in the chain (a POST or the websocket handshake)."""
    import httpx
    import websocket

    for link in _chain(error):
        if isinstance(link, httpx.HTTPStatusError):
            return link.response.status_code
        if isinstance(link, websocket.WebSocketBadStatusException):
            return link.status_code
    return None


def _transport_failure(error: BaseException) -> BaseException | None:
    """The first exception in the chain that is a network failure, by type: refused, DNS,
    TLS, reset, timed out, closed websocket."""
    import httpx
    import websocket

    # OSError covers the socket's own: refused, reset, DNS (gaierror), TLS (SSLError), TimeoutError.
    transport = (
        OSError,
        httpx.TransportError,
        websocket.WebSocketConnectionClosedException,
        websocket.WebSocketAddressException,
        websocket.WebSocketTimeoutException,
        websocket.WebSocketProxyException,
    )
    return next((link for link in _chain(error) if isinstance(link, transport)), None)


def _is_timeout(error: BaseException) -> bool:
    import httpx
    import websocket

    return isinstance(error, (TimeoutError, httpx.TimeoutException, websocket.WebSocketTimeoutException))


# NDIF's API refuses clients older than NDIF_MIN_NNSIGHT_VERSION with this sentence (HTTP 400).
_MIN_VERSION = re.compile(r"client nnsight version (\S+) is below the minimum supported (\S+?)\.?(?:\s|$)", re.I)


def diagnose(error: BaseException, host: str) -> str:
    """What went wrong, in order: nnsight version and API key refusals, transport failures
    (by exception type), HTTP refusals by status, then what the server said about the run."""
    text = " ".join(str(link) for link in _chain(error))
    lowered = text.lower()
    status = _http_status(error)
    too_old = _MIN_VERSION.search(text)
    if too_old:
        client, minimum = too_old.groups()
        return (
            f"client nnsight version {client} is below the minimum supported {minimum} on {host}: "
            f"`pip install 'nnsight>={minimum}'`"
        )
    if status in (401, 403) or (status == 400 and "api key" in lowered):
        return (
            f"NDIF at {host} refused the API key (HTTP {status}): set NDIF_API_KEY (environment or .env) "
            "to a key that is allowed to use this model"
        )
    failure = _transport_failure(error)
    if failure is not None and _is_timeout(failure):
        return (
            f"the request to {host} timed out ({type(failure).__name__}): a remote grid is sent as one "
            "request unless split, so run fewer cells per request (`run(..., cells_per_request=N, "
            "checkpoint=PATH)` keeps each finished request), raise `timeout`, or try later"
        )
    if failure is not None:
        return (
            f"the NDIF server at {host} is unreachable ({type(failure).__name__}): check NDIF_HOST and that "
            "the server is up (`superscopes remote status`)"
        )
    if status == 404:
        return (
            f"{host} answered 404 Not Found: it does not look like an NDIF server (no /subscribe or /request); "
            "check NDIF_HOST"
        )
    if status == 503:
        return f"the NDIF server at {host} is up but cannot run requests now (HTTP 503): try again in a few minutes"
    if status == 400 and "error parsing the body" in lowered:
        # ndif 0.1.2 reads the request as multipart form data, whose parser (starlette)
        # refuses a part over 1 MB: the pickled request, after compression.
        return (
            f"the NDIF server at {host} could not read the request (HTTP 400, body not parsed): a server that "
            "takes requests as form data refuses one over about 1 MB, which tensors sent with the request "
            "reach quickly (a d x d affine map is d*d*4 bytes: 1.3 MB at d = 576); send smaller tensors, "
            "or fewer cells per request (`run(..., cells_per_request=N)`)"
        )
    if status is not None:
        return f"the NDIF server at {host} failed to accept the request (HTTP {status})"
    if "not whitelisted" in lowered:
        return "the server refused code that imports a module it does not allow"
    # Public NDIF says "... is not dedicated and hotswapping is not supported for this API key"
    # or "... is currently unavailable for deployment"; ndif 0.1.2 "Could not deploy this model".
    if any(
        n in lowered
        for n in (
            "not deployed",
            "could not deploy",
            "no deployment",
            "model not found",
            "not dedicated",
            "unavailable for deployment",
        )
    ):
        return f"the model is not deployed on {host}; `superscopes remote status MODEL` lists what is"
    if any(n in lowered for n in ("nnsight version", "version mismatch")):
        return "the client and server disagree on versions: compare with `superscopes remote status`"
    if any(n in lowered for n in ("timed out", "time limit", "timeout")):
        return (
            f"the run exceeded the time limit of {host}: a remote grid is one request unless split, so run "
            "fewer cells per request (`run(..., cells_per_request=N)`)"
        )
    return "the server raised an exception while running the request"


def explain(error: BaseException, model_id: str | None = None) -> RemoteRunError:
    """A ``RemoteRunError`` for a failed remote run: the diagnosis, then the original message,
    with the API key scrubbed from both and from ``error``'s own chain (which callers raise from)."""
    from nnsight import CONFIG

    diagnosis = diagnose(error, CONFIG.API.HOST)
    _scrub(error)
    where = f" ({model_id})" if model_id else ""
    return RemoteRunError(
        redact(f"remote run failed{where}: {diagnosis}. Server/client said: {type(error).__name__}: {error}")
    )


def _repo_of(name: str, value: dict) -> str:
    """The repo id of a /status entry: a field on public NDIF, inside the model key on ndif 0.1.2."""
    if "repo_id" in value:
        return value["repo_id"]
    found = re.search(r'"repo_id": "([^"]+)"', name)
    return found.group(1) if found else name


def compare_versions(client: str, server: str) -> tuple[bool, str]:
    """``(ok, sentence)`` for the client's and server's nnsight: a patch-level difference is a
    warning (requests serialise the same across 0.8.0/0.8.1), a major or minor one an error."""
    from packaging.version import InvalidVersion, Version

    if client == server:
        return True, f"client {client}, server {server}"
    try:
        same_minor = Version(client).release[:2] == Version(server).release[:2]
    except InvalidVersion:
        same_minor = False
    if same_minor:
        return True, f"warning: client {client}, server {server} differ in patch level only (requests work across them)"
    return False, (
        f"client {client}, server {server} differ in minor version: install the server's, "
        f"`pip install 'nnsight=={server}'`"
    )


def _is_loopback(host: str) -> bool:
    from urllib.parse import urlparse

    return urlparse(host).hostname in ("localhost", "127.0.0.1", "::1")


def check_key(host: str, key: str | None) -> tuple[bool, str]:
    """``(ok, sentence)``: ask the server whom the key belongs to (``/whoami``). A refusal is
    an error; a key the server does not know is an error on a remote host and a warning on
    this machine (a local server may not check keys at all)."""
    import httpx
    from nnsight import ndif

    if not key:
        return False, "NDIF_API_KEY is not set (public NDIF needs one; a self-hosted server may not)"
    try:
        identity = ndif.whoami(key)
    except httpx.HTTPStatusError as error:
        status = error.response.status_code
        if status == 404:
            return True, "set (not shown); this server has no /whoami, so the key cannot be checked before a run"
        return False, f"refused by {host} (HTTP {status}): set NDIF_API_KEY to a valid key"
    except Exception as error:  # the server answered /status: anything else here is the server's
        return False, redact(f"could not be checked ({type(error).__name__}: {error})")
    if identity.get("email"):
        return True, f"accepted for {identity['email']}"
    if _is_loopback(host):
        return True, "warning: this server does not know the key (fine if it does not check keys)"
    return False, f"not recognised by {host}: set NDIF_API_KEY to the key of your NDIF account"


def status_report(repo_id: str | None = None, dotenv: Path | None = None) -> list[tuple[str, bool, str]]:
    """``(check, ok, sentence)`` rows: server reachable, versions compatible, key, model deployed."""
    import nnsight
    from nnsight import CONFIG, ndif

    configure(dotenv)
    host = CONFIG.API.HOST
    rows: list[tuple[str, bool, str]] = []
    try:
        raw = ndif._get("/status")
    except Exception as error:
        status = _http_status(error)
        if _transport_failure(error) is not None:
            sentence = f"{host} is unreachable ({type(error).__name__}): check NDIF_HOST"
        elif status in (401, 403):  # an NDIF server that checks keys on every path
            rows.append(("server", True, f"{host} answers"))
            rows.append(
                ("api key", False, f"refused by {host} (HTTP {status} to /status): set NDIF_API_KEY to a valid key")
            )
            return rows
        elif status in (502, 503, 504):
            sentence = (
                f"{host} is up but unavailable now (HTTP {status} to /status: starting, overloaded or behind a "
                "proxy whose server is down); try again later"
            )
        elif status is not None:
            sentence = (
                f"{host} answered HTTP {status} to /status: it does not look like an NDIF server (check NDIF_HOST)"
            )
        else:
            sentence = f"{host} gave no NDIF status ({type(error).__name__}: {error}): check NDIF_HOST"
        rows.append(("server", False, redact(sentence)))
        return rows
    rows.append(("server", True, f"{host} answers"))
    try:
        remote_version = ndif.get_remote_env(force_refresh=True)["packages"].get("nnsight", "unknown")
        rows.append(("nnsight", *compare_versions(nnsight.__version__, remote_version)))
    except Exception as error:
        rows.append(("nnsight", False, f"the server did not report its environment ({type(error).__name__})"))
    rows.append(("api key", *check_key(host, CONFIG.API.APIKEY)))
    deployed = {_repo_of(name, value): value for name, value in raw.get("deployments", {}).items()}
    if repo_id is not None:
        entry = deployed.get(repo_id)
        state = entry.get("application_state", "unknown state") if entry else "not deployed"
        rows.append(("model", state == "RUNNING", f"{repo_id}: {state}"))
    else:
        names = ", ".join(sorted(deployed)) or "none"
        rows.append(("models", bool(deployed), f"deployed: {names}"))
    return rows


def session_backend(model: Model, remote: bool | str, timeout: float | None):
    """The backend of a remote session: nnsight's own, or with ``timeout`` one that gives up
    (``TimeoutError``) when no result has come back that many seconds after the request."""
    if timeout is None or remote == "local":
        return None  # model.session(remote=...) builds nnsight's own
    from nnsight.intervention.backends.remote import RemoteBackend
    from nnsight.schema.response import Status

    class DeadlineBackend(RemoteBackend):
        # nnsight 0.8's blocking request loop (RemoteBackend.request) with a deadline: it waits on
        # the websocket forever, so a stalled server would hang the client.
        def request(self, request, tracer):
            import json
            import time

            import websocket

            blob = self._serialize(tracer)
            deadline = time.monotonic() + timeout
            header = {"ndif-api-key": self.api_key} if self.api_key else None
            connection = websocket.create_connection(f"{self.ws_host}/subscribe", header=header, timeout=timeout)
            try:
                request.session_id = json.loads(connection.recv())["session_id"]
                self.send(request, blob)
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"no result from {self.host} within the client time-out of {timeout:g} s")
                    connection.settimeout(min(left, 0.5))
                    try:
                        message = connection.recv()
                    except websocket.WebSocketTimeoutException:
                        self.display.refresh()
                        continue
                    response = self.parse(message)
                    result = self.handle(response)
                    if response.status == Status.COMPLETED:
                        return result
            finally:
                connection.close()

    host = remote if isinstance(remote, str) else None
    return DeadlineBackend(model.to_model_key(), host=host, env=model._remoteable_get_env())


@contextmanager
def request(
    model: Model,
    remote: bool | str,
    ship: tuple[ModuleType, ...] = (),
    timeout: float | None = None,
    name: str | None = None,
) -> Iterator[dict]:
    """One remote request, the one way every remote run goes: ``configure`` (host, key, the
    trace code in ``ship`` sent by value), the keyword arguments of ``model.session`` (with
    ``timeout``'s deadline), and any failure of the body as a ``RemoteRunError`` (``explain``;
    ``name``: the model's, for the message)::

        with remote.request(model, remote, ship=(graph,)) as options:
            with model.session(**options):
                result = nnsight.save(...)

    The caller opens the session itself: nnsight compiles the ``with`` block of the frame that
    enters it, so the block must be the caller's, not this function's."""
    configure(ship=ship)
    options = {"remote": remote, "backend": session_backend(model, remote, timeout)}
    try:
        yield options
    except Exception as error:
        raise explain(error, name) from error
