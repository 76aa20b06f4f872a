"""What every recipe shares: its command line, output folder, resumable cells, summary.md.

A recipe module defines ``NAME``, ``DESCRIPTION`` and ``main(argv=None)``; it builds its
parser with ``parser(...)``, calls ``setup(args)`` for the model(s) and output folder, runs
its units through ``ResultStore`` (resume), and ends with ``write_summary``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from superscopes.models import DEFAULT_MODEL
from superscopes.parsing import HelpFormatter
from superscopes.results import ResultStore

DATA = Path(__file__).parent / "data"


def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m recipes.{name}", description=description, formatter_class=HelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, HF repo id or local directory")
    p.add_argument("--remote", action="store_true", help="run on NDIF (NDIF_HOST, NDIF_API_KEY)")
    p.add_argument("--quick", action="store_true", help="a CI-sized run (about 2 minutes on a laptop CPU)")
    p.add_argument("--out", help="output folder (default results/<name>, or results/<name>-quick)")
    p.add_argument("--seed", type=int, default=0, help="seed for anything sampled or random")
    p.add_argument("--batch-size", type=int, default=64, help="patched rows per forward pass")
    return p


@dataclass
class Run:
    name: str
    args: argparse.Namespace
    out: Path
    command: str

    @property
    def remote(self) -> bool:
        return bool(self.args.remote)

    def store(self, filename: str, unit_columns: list[str]) -> ResultStore:
        return ResultStore(self.out / filename, unit_columns)

    def load_model(self, name: str | None = None):
        import superscopes

        return superscopes.load(name or self.args.model, remote=self.args.remote)


def setup(name: str, args: argparse.Namespace, argv: list[str] | None) -> Run:
    suffix = "-quick" if args.quick else ""
    out = Path(args.out or Path("results") / f"{name}{suffix}")
    out.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else argv
    command = f"python -m recipes.{name} " + " ".join(shlex.quote(a) for a in given)
    return Run(name, args, out, command.strip())


def markdown_table(table: pd.DataFrame, digits: int = 3) -> str:
    if table.empty:
        return "(empty)"

    def cell(value) -> str:
        text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", "\\n")

    rows = [list(map(str, table.columns)), ["---"] * len(table.columns)]
    rows += [[cell(v) for v in row] for row in table.itertuples(index=False)]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def write_summary(run: Run, title: str, ours: str, paper: str, settings: dict[str, object],
                  findings: list[str], tables: dict[str, pd.DataFrame] | None = None,
                  figures: list[str] | None = None) -> Path:  # fmt: skip
    """summary.md: our number next to the paper's, the settings, the command that made it."""
    lines = [f"# {title}", "", f"- **Ours:** {ours}", f"- **Paper:** {paper}", "", "## Settings", ""]
    lines += [f"- {key}: {value}" for key, value in settings.items()]
    lines += ["", f"Command: `{run.command}`", "", "## What it shows", ""]
    lines += [f"- {finding}" for finding in findings]
    for caption, table in (tables or {}).items():
        lines += ["", f"### {caption}", "", markdown_table(table)]
    for figure in figures or []:
        lines += ["", f"![{figure}]({figure})"]
    path = run.out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
