"""The Superscopes web app: a JSON API on the standard library's ``ThreadingHTTPServer``.

The page (``static/``) sends a grid; the request path parses and bounds every field
(``request.py``: pure functions), validates the grid with the core's ``plan`` (no forward
pass) and queues it (``grid.py``, ``scheduler.py``). One worker thread (the model is one) runs
queued jobs in order, each in chunks, publishing rows between them; then the controls of each
best readout. Panel jobs (``panel_jobs.py``: a cell's or a latent's panel) run before queued
grids and between a grid's chunks. Models load lazily and stay cached (``model_cache.py``).
Runs are kept in a small SQLite store (``store.py``), so that a run's URL (``/?run=<id>``)
restores it after a reload or a restart. ``api.py`` holds what each endpoint does, ``web.py``
the HTTP side (routes, host and origin checks, the endpoint list), ``errors.py`` the errors
and their redaction.

This module starts it: ``serve`` and the ``superscopes app`` options.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from superscopes.app.api import App
from superscopes.app.grid import best_rows
from superscopes.app.request import LIMITS
from superscopes.app.store import RunStore
from superscopes.app.web import STATIC, Server
from superscopes.models import DEFAULT_MODEL
from superscopes.parsing import CommandParser

if TYPE_CHECKING:
    from superscopes.models import Model

# Names the CLI, the package and older imports read from here.
__all__ = ["LIMITS", "STATIC", "App", "add_arguments", "best_rows", "cmd_app", "main", "make_server", "serve"]


def make_server(app: App | None = None, host: str = "127.0.0.1", port: int = 8765, verbose: bool = False) -> Server:
    """A bound, not yet serving, server (``port=0``: any free port; see ``server.url``)."""
    return Server((host, port), app or App(), verbose=verbose)


def serve(
    model: Model = DEFAULT_MODEL,
    host: str = "127.0.0.1",
    port: int = 8765,
    remote_models: list[str] | None = None,
    max_cells: int | None = None,
    verbose: bool = False,
    store: str | Path | None = None,
    saes: list[str] | None = None,
    generators: list[str] | None = None,
    corpora: list[str] | None = None,
) -> int:
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
            app = App(
                default_model="model",
                models={"model": model},
                remote_models=remote_models,
                limits=limits,
                store=runs,
                **panels,
            )
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
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model selected when the page opens; loaded on first use (default {DEFAULT_MODEL})",
    )
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    parser.add_argument(
        "--remote-models",
        default="",
        help="comma list of models offered on NDIF when NDIF_API_KEY or NDIF_HOST is set (default: the embedded ones)",
    )
    parser.add_argument("--max-cells", type=int, default=LIMITS["max_cells"], help="cap on cells per run")
    parser.add_argument(
        "--store",
        default=None,
        help="SQLite file that keeps runs across restarts (default $SUPERSCOPES_CACHE/app/runs.sqlite)",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")
    parser.add_argument(
        "--sae",
        action="append",
        default=[],
        metavar="FOLDER",
        help="an SAE (SAELens folder) for the cell's SAE breakdown; repeatable (the embedded SAEs are always offered)",
    )
    parser.add_argument(
        "--generator",
        action="append",
        default=[],
        metavar="PATH",
        help="a trained InverseScope generator (generator.pt or its folder, whose pairs.pt is offered as a corpus); "
        "repeatable",
    )
    parser.add_argument(
        "--corpus",
        action="append",
        default=[],
        metavar="PATH",
        help="a corpus of (input, activation) pairs (pairs.pt or its folder) for the nearest-corpus inputs; repeatable",
    )
    return parser


def cmd_app(args: argparse.Namespace) -> int:
    remote = [m for m in args.remote_models.split(",") if m] or None
    return serve(
        args.model,
        args.host,
        args.port,
        remote,
        args.max_cells,
        args.verbose,
        args.store,
        args.sae,
        args.generator,
        args.corpus,
    )


def main(argv: list[str] | None = None) -> int:
    """``superscopes app [--model NAME] [--port N] [--host 127.0.0.1]``: its --help shows every
    default, as the ``superscopes app`` verb's does (the same ``CommandParser``)."""
    parser = add_arguments(CommandParser(prog="superscopes app", description="serve the Superscopes page"))
    return cmd_app(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
