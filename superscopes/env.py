"""Settings from the environment or a ``.env`` file: every variable of ``.env.example``.

The process environment wins over ``.env`` (read from the working directory on each call, so
a ``cd`` or an edited file counts). Values are returned, never printed: ``remote.redact``
scrubs the secrets among them from any text the toolkit shows.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VARS = ("HF_TOKEN", "SUPERSCOPES_CACHE", "NDIF_HOST", "NDIF_API_KEY")
SECRETS = ("HF_TOKEN", "NDIF_API_KEY")


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


def value(name: str, dotenv: Path | None = None) -> str | None:
    """``name`` from the process environment, else from ``.env`` (default ./.env); empty is unset."""
    if name not in ENV_VARS:
        raise KeyError(f"{name!r} is not a superscopes setting; the settings are {', '.join(ENV_VARS)}")
    return os.environ.get(name) or read_dotenv(dotenv or Path.cwd() / ".env").get(name) or None


def export_hf_token(dotenv: Path | None = None) -> None:
    """Put ``.env``'s HF_TOKEN where the Hugging Face libraries read it (the process
    environment) when the process has none of its own."""
    token = value("HF_TOKEN", dotenv)
    if token and not os.environ.get("HF_TOKEN"):
        os.environ["HF_TOKEN"] = token
