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
