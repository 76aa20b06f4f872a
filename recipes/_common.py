"""What every recipe shares, so that a recipe only configures: data, conditions, metrics, figure.

A recipe module defines ``NAME``, ``DESCRIPTION``, ``build_parser()`` (starting from
``parser(NAME, DESCRIPTION)``), an ``experiment(run)`` and
``main = recipe_main(NAME, build_parser, experiment)``. The runner owns

- the command line every recipe has (``--model``, ``--remote``, ``--quick``, ``--out``,
  ``--seed``, ``--batch-size``, ``--threads``, ``--new-file``) and torch's thread count
  (set for the run, restored after);
- the output folder and the command recorded in ``summary.md``;
- resumable stores keyed by the run's settings (``Run.store``): a rerun with the same
  settings skips finished units (``Run.pending``), one with other settings is refused (or
  writes a new file with ``--new-file``);
- the check that the finished table holds exactly the grid's rows (``Run.cells``), and the
  summary (``write_summary``), which states the run's wall time as logged in ``timings.csv``
  (``record_time``: one row per invocation, with its model and threads, updated as each unit
  finishes, so that a killed invocation's finished units keep their cost).
Column types (booleans, token-id lists) come back from the stores as written.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shlex
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pandas as pd

from superscopes.corpus import PATCHSCOPES_DATA
from superscopes.models import DEFAULT_MODEL, EMBEDDED
from superscopes.parsing import DEFAULT_BATCH_SIZE, DEFAULT_THREADS, CommandParser
from superscopes.results import ResultStore, SettingsMismatchError, write_atomic

DATA = Path(__file__).parent / "data"
T = TypeVar("T")
# Options that change where or how fast a run goes, never its rows: left out of the settings.
RUN_ONLY = ("out", "threads", "batch_size", "remote", "new_file", "cells_per_request")


@functools.cache
def data_fingerprint() -> str:
    """A hash of the data the recipes read (recipes/data and the package's Patchscopes data):
    edited prompts or answers make earlier rows another run's. Files are named as if all lay
    under recipes/data, where the Patchscopes data was when the committed runs were made, so
    moving it into the package kept their fingerprints."""
    named = {str(p.relative_to(DATA)): p for p in DATA.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    named |= {f"patchscopes/{p.relative_to(PATCHSCOPES_DATA)}": p for p in PATCHSCOPES_DATA.rglob("*") if p.is_file()}
    digest = hashlib.sha256()
    for name in sorted(named):
        digest.update(name.encode() + b"\0" + named[name].read_bytes())
    return digest.hexdigest()[:16]


def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = CommandParser(prog=f"python -m superscopes.recipes.{name}", description=description)
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, HF repo id or local directory")
    p.add_argument("--remote", action="store_true", help="run on NDIF (NDIF_HOST, NDIF_API_KEY)")
    p.add_argument("--quick", action="store_true", help="a CI-sized run (about 2 minutes on a laptop CPU)")
    p.add_argument("--out", help="output folder (default results/<name>, or results/<name>-quick)")
    p.add_argument("--seed", type=int, default=0, help="seed for anything sampled or random")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="patched rows per forward pass")
    p.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS, help="torch CPU threads (1 is fastest on a shared CPU)"
    )
    p.add_argument(
        "--cells-per-request",
        type=int,
        help="with --remote: split each grid into NDIF requests of at most this many cells "
        "(default: one request per grid)",
    )
    p.add_argument(
        "--new-file",
        action="store_true",
        help="if the output folder holds rows made with other settings, write a new table beside them "
        "instead of stopping",
    )
    return p


@dataclass
class Run:
    name: str
    args: argparse.Namespace
    out: Path
    command: str
    started: float = field(default_factory=time.time)
    # Each store this invocation opened, with its finished units when opened: what the invocation added.
    opened: dict[Path, tuple[ResultStore, int]] = field(default_factory=dict)
    seconds: float | None = None  # set by record_time (None: no logged invocation added results)

    @property
    def remote(self) -> bool:
        return bool(self.args.remote)

    def scope(self, model, scope, **kwargs) -> pd.DataFrame:
        """``superscopes.run`` with this run's remote settings (one request per grid, or
        ``--cells-per-request`` cells per request) and no progress bar."""
        import superscopes

        return superscopes.run(
            model,
            scope,
            remote=self.args.remote,
            progress=False,
            cells_per_request=self.args.cells_per_request if self.args.remote else None,
            threads=self.args.threads,
            **kwargs,
        )

    @property
    def settings(self) -> dict[str, object]:
        """What produced the rows: the recipe, every option that changes them, and its data (the prompts)."""
        options = {k: v for k, v in sorted(vars(self.args).items()) if k not in RUN_ONLY}
        return {"recipe": self.name, **options, "data": data_fingerprint()}

    def store(self, filename: str, unit_columns: list[str], **settings: object) -> ResultStore:
        """A resumable table of this run; ``settings``: what else decides its rows (resolved layers...)."""
        on_mismatch = "new" if self.args.new_file else "refuse"
        store = _TimedStore(self.out / filename, unit_columns, {**self.settings, **settings}, on_mismatch)
        store.run = self
        self.opened.setdefault(store.path, (store, len(store.done())))
        return store

    @staticmethod
    def pending(store: ResultStore, items: Iterable[T], key: Callable[[T], Sequence[Hashable]]) -> Iterator[T]:
        """The items whose unit (``key(item)``: its unit-column values) is not finished yet."""
        done = store.done()
        return (item for item in items if store.key(key(item)) not in done)

    @staticmethod
    def cells(store: ResultStore, expected: int, unique: Sequence[str] | None = None) -> pd.DataFrame:
        """The finished table, checked to hold exactly the grid's ``expected`` rows (unique on ``unique``)."""
        cells = store.load()
        if len(cells) != expected or (unique and cells.duplicated(list(unique)).any()):
            raise SystemExit(f"{store.path} has {len(cells)} rows but this grid has {expected}; rerun to finish it")
        return cells

    def load_model(self, name: str | None = None):
        import superscopes

        return superscopes.load(name or self.args.model, remote=self.args.remote)


class _TimedStore(ResultStore):
    """A run's store: each append also logs the invocation's time so far (``record_time``)."""

    run: Run

    def append(self, frame: pd.DataFrame) -> None:
        super().append(frame)
        record_time(self.run)


def setup(name: str, args: argparse.Namespace, argv: list[str] | None) -> Run:
    suffix = "-quick" if args.quick else ""
    out = Path(args.out or Path("results") / f"{name}{suffix}")
    out.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else argv
    command = f"python -m superscopes.recipes.{name} " + " ".join(shlex.quote(a) for a in given)
    return Run(name, args, out, command.strip())


def run_recipe(
    name: str,
    build_parser: Callable[[], argparse.ArgumentParser],
    experiment: Callable[[Run], None],
    argv: list[str] | None = None,
) -> Path:
    """Parse, make the output folder, run ``experiment`` on ``--threads`` threads (restored after)."""
    import torch

    args = build_parser().parse_args(argv)
    run = setup(name, args, argv)
    previous, started = torch.get_num_threads(), time.time()
    torch.set_num_threads(args.threads)
    try:
        experiment(run)
        print(f"wrote {run.out} ({time.time() - started:.0f} s)")
        return run.out
    except SettingsMismatchError as error:
        raise SystemExit(
            f"{name}: {error} (here: --out DIR for another folder, --new-file to write beside it)"
        ) from None
    finally:
        torch.set_num_threads(previous)


def recipe_main(
    name: str, build_parser: Callable[[], argparse.ArgumentParser], experiment: Callable[[Run], None]
) -> Callable[[list[str] | None], Path]:
    """A recipe's ``main(argv=None)``: ``run_recipe`` of its parser and experiment; returns the output folder.

    From the command line (``python -m superscopes.recipes.NAME``, no ``argv``) a user error is
    the CLI's one line (``superscopes: error: ...``, status 2), not a traceback; called with
    ``argv`` (``superscopes recipe NAME``, tests) it raises."""

    def main(argv: list[str] | None = None) -> Path:
        if argv is not None:
            return run_recipe(name, build_parser, experiment, argv)
        from superscopes.parsing import USER_ERRORS, error_line

        try:
            return run_recipe(name, build_parser, experiment, None)
        except USER_ERRORS as error:
            print(error_line(error), file=sys.stderr)
            raise SystemExit(2) from None

    return main


def resolve_layers(layers: list[int] | str | None, n_layers: int, default: list[int]) -> list[int]:
    """A ``--layers`` value (parsed by ``superscopes.parsing.parse_layers``; None: ``default``) as a list."""
    if layers is None:
        return default
    return list(range(n_layers)) if layers == "all" else layers


def depth_layers(fractions: Iterable[float], n_layers: int) -> list[int]:
    """Layers at these fractions of the model's depth (0 = first, 1 = last), as in the papers' figures."""
    return sorted({min(n_layers - 1, max(0, round(f * (n_layers - 1)))) for f in fractions})


def record_time(run: Run) -> float | None:
    """Log this invocation in ``timings.csv`` (when it started and last logged, its seconds so far,
    the finished units it added to the run's stores, the model(s), threads and CPUs); returns the
    seconds spent by the invocations that added units (the cost of the results, whatever the
    number of resumes), None when none is logged (results made before the log). Called after every
    appended unit and by ``write_summary``; each call rewrites the invocation's own row (keyed by
    its start), so a killed invocation keeps the time up to its last finished unit. An invocation
    that found no finished unit starts the log anew: the rows of earlier ones were deleted or
    never made."""
    path = run.out / "timings.csv"
    found = sum(before for _, before in run.opened.values())
    added = sum(len(store.done()) - before for store, before in run.opened.values())
    models = [m for m in (getattr(run.args, "model", None), getattr(run.args, "other", None)) if m]
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started))
    row = {"started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    row |= {"seconds": round(time.time() - run.started, 1), "added": added, "model": " + ".join(models)}
    log = pd.DataFrame([{**row, "threads": run.args.threads, "cpus": os.cpu_count()}])
    if found and path.exists():  # an older log may name its count cells_added and lack the start
        earlier = pd.read_csv(path).rename(columns={"cells_added": "added"})
        earlier = earlier[earlier["started"] != started] if "started" in earlier else earlier
        log = pd.concat([earlier, log], ignore_index=True)[list(log.columns)]
        log = log.astype({"threads": "Int64", "cpus": "Int64"})  # counts, blank where an older log has none
    write_atomic(path, log.to_csv(index=False).encode())  # a kill mid-write leaves the previous log
    made = log.loc[log["added"] > 0, "seconds"]
    run.seconds = float(made.sum()) if len(made) else None
    return run.seconds


def markdown_table(table: pd.DataFrame, digits: int = 3) -> str:
    if table.empty:
        return "(empty)"

    def cell(value) -> str:
        text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", "\\n")

    rows = [list(map(str, table.columns)), ["---"] * len(table.columns)]
    rows += [[cell(v) for v in row] for row in table.itertuples(index=False)]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def write_summary(
    run: Run,
    title: str,
    ours: str,
    paper: str,
    settings: dict[str, object],
    findings: list[str],
    tables: dict[str, pd.DataFrame] | None = None,
    figures: list[str] | None = None,
) -> Path:
    """summary.md: our number next to the paper's, the settings, the command that made it, its wall time."""
    seconds = record_time(run)
    if seconds is None:
        wall = "not logged: the results were made before timings.csv, which logs every invocation since"
    else:
        wall = f"{seconds:.0f} s over the invocations that added results (timings.csv: each, its model and threads)"
    here = f"this invocation: {run.args.threads} thread(s), {os.cpu_count()} CPUs"
    settings = {**settings, "wall time": f"{wall}; {here}"}
    lines = [f"# {title}", "", f"- **Ours:** {ours}", f"- **Paper:** {paper}", "", "## Settings", ""]
    lines += [f"- {key}: {value}" for key, value in settings.items()]
    embedded = [m for m in (getattr(run.args, "model", None), getattr(run.args, "other", None)) if m in EMBEDDED]
    if embedded:  # a reader comparing with the papers' bf16/fp16 models must know
        lines.append(
            f"- weights: {', '.join(embedded)} are the embedded 4-bit GGUF checkpoints de-quantised to "
            "float32, not the original half-precision weights"
        )
    lines += ["", f"Command: `{run.command}`", "", "## What it shows", ""]
    lines += [f"- {finding}" for finding in findings]
    for caption, table in (tables or {}).items():
        lines += ["", f"### {caption}", "", markdown_table(table)]
    for figure in figures or []:
        lines += ["", f"![{figure}]({figure})"]
    path = run.out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
