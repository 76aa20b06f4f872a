"""The explorer's errors and what the page and the terminal see of them.

The exceptions map to HTTP statuses (``web.Handler`` does the mapping); ``redact`` keeps
secret values (API keys, tokens) out of replies and logs; ``error_text`` is one line for the
page, ``log_error`` the traceback for the terminal.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Mapping

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
    """A second job of one kind from one page (HTTP 409): ``job_id`` is the one it waits for."""

    def __init__(self, job_id: str, what: str = "a run"):
        super().__init__(f"{what} is already queued or in progress on this page: wait for it to finish or cancel it")
        self.job_id = job_id


def show(value: object) -> str:
    """A value for an error message, cut short: a request may carry 64 KB in one field."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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


def error_text(error: BaseException) -> str:
    """One line for the page: the message of expected errors, the type for unexpected ones."""
    from superscopes.models import FetchError

    if isinstance(error, KeyError) and error.args:
        message = str(error.args[0])
    elif isinstance(error, (ValueError, FetchError, OSError)):
        message = str(error)
    else:
        message = f"{type(error).__name__}: {error}"
    return redact(message or type(error).__name__)


def log_error(error: BaseException) -> None:
    """The traceback on the terminal, with secrets redacted (never in a reply)."""
    print(redact("".join(traceback.format_exception(error))), file=sys.stderr, end="", flush=True)
