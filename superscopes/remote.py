"""NDIF configuration: host and API key from the environment or a ``.env`` file.

The key is handed to nnsight's config and nowhere else: it is never printed, saved in
results or included in error messages (``redact`` scrubs it from any text we show).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VARS = ("NDIF_API_KEY", "NDIF_HOST")


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (comments, blanks, ``export`` and quotes handled)."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.removeprefix("export ").split("=", 1)
        values[key.strip()] = value.strip().strip("'\"")
    return values


def settings(dotenv: Path | None = None) -> dict[str, str | None]:
    """NDIF settings: the process environment wins over ``.env`` (default: ./.env)."""
    file_values = read_dotenv(dotenv or Path.cwd() / ".env")
    return {name: os.environ.get(name) or file_values.get(name) or None for name in ENV_VARS}


def configure(dotenv: Path | None = None) -> None:
    """Point nnsight at the configured NDIF host and key, and ship our trace code by value."""
    import nnsight
    from nnsight import CONFIG

    from superscopes import ops, scope, sites

    values = settings(dotenv)
    if values["NDIF_HOST"]:
        CONFIG.API.HOST = values["NDIF_HOST"]
    if values["NDIF_API_KEY"]:
        CONFIG.API.APIKEY = values["NDIF_API_KEY"]
    # The server does not have superscopes installed: send the snippet modules' source.
    for module in (ops, sites, scope):
        nnsight.register(module)


def redact(text: str) -> str:
    """``text`` with the API key (if any is configured) replaced by ``***``."""
    key = settings()["NDIF_API_KEY"]
    return text.replace(key, "***") if key else text


class RemoteRunError(RuntimeError):
    """A remote run failed; the message says what happened and what to do."""


# (substring of the client's or server's message, lower-cased) -> what to tell the user.
_DIAGNOSES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("401 unauthorized", "403 forbidden", "unauthorized", "forbidden", "api key", "apikey", "not allowed"),
     "NDIF refused the API key for this model: set NDIF_API_KEY (environment or .env) to a key "
     "that is allowed to use it"),
    (("not deployed", "could not deploy", "not running", "no deployment", "model not found", "not found"),
     "the model is not deployed on {host}; `superscopes remote status MODEL` lists what is"),
    (("connect", "connection refused", "name or service not known", "unreachable", "failed to send request"),
     "the NDIF server at {host} is unreachable: check NDIF_HOST and that the server is up "
     "(`superscopes remote status`)"),
    (("timed out", "timeout"),
     "the request to {host} timed out: try a smaller grid (batch_size, fewer cells) or later"),
    (("version", "mismatch"),
     "the client and server disagree on versions: compare with `superscopes remote status`"),
)  # fmt: skip


def explain(error: BaseException, model_id: str | None = None) -> RemoteRunError:
    """A ``RemoteRunError`` for a failed remote run: the diagnosis, then the original message,
    with the API key scrubbed."""
    from nnsight import CONFIG

    original = f"{type(error).__name__}: {error}"
    lowered = original.lower()
    diagnosis = "the server raised an exception while running the request"
    for needles, advice in _DIAGNOSES:
        if any(n in lowered for n in needles):
            diagnosis = advice.format(host=CONFIG.API.HOST)
            break
    where = f" ({model_id})" if model_id else ""
    return RemoteRunError(redact(f"remote run failed{where}: {diagnosis}. Server/client said: {original}"))


def _repo_of(name: str, value: dict) -> str:
    """The repo id of a /status entry: a field on public NDIF, inside the model key on ndif 0.1.2."""
    import re

    if "repo_id" in value:
        return value["repo_id"]
    found = re.search(r'"repo_id": "([^"]+)"', name)
    return found.group(1) if found else name


def status_report(repo_id: str | None = None, dotenv: Path | None = None) -> list[tuple[str, bool, str]]:
    """``(check, ok, sentence)`` rows: server reachable, versions compatible, key, model deployed."""
    import nnsight
    from nnsight import CONFIG, ndif

    configure(dotenv)
    host = CONFIG.API.HOST
    rows: list[tuple[str, bool, str]] = []
    try:
        raw = ndif._get("/status")
    except Exception as error:  # any transport failure means the same thing to the user
        rows.append(("server", False, redact(f"{host} is unreachable ({type(error).__name__}): check NDIF_HOST")))
        return rows
    rows.append(("server", True, f"{host} answers"))
    try:
        remote_version = ndif.get_remote_env(force_refresh=True)["packages"].get("nnsight", "unknown")
        same = remote_version == nnsight.__version__
        rows.append(("nnsight", same, f"client {nnsight.__version__}, server {remote_version}"
                     + ("" if same else ": install the server's version to avoid subtle failures")))  # fmt: skip
    except Exception as error:
        rows.append(("nnsight", False, f"the server did not report its environment ({type(error).__name__})"))
    key = settings(dotenv)["NDIF_API_KEY"]
    rows.append(("api key", bool(key), "set (not shown)" if key else "NDIF_API_KEY is not set (public NDIF needs one; a self-hosted server may not)"))
    deployed = {_repo_of(name, value): value for name, value in raw.get("deployments", {}).items()}
    if repo_id is not None:
        entry = deployed.get(repo_id)
        state = entry.get("application_state", "unknown state") if entry else "not deployed"
        rows.append(("model", state == "RUNNING", f"{repo_id}: {state}"))
    else:
        names = ", ".join(sorted(deployed)) or "none"
        rows.append(("models", bool(deployed), f"deployed: {names}"))
    return rows
