"""Resumable result tables: long runs append finished rows as they go and skip them on rerun.

A ``ResultStore`` is a CSV that grows one finished unit (e.g. one source prompt's cells) at
a time. Rows are written with a flush and fsync per unit, so an interrupted run loses at
most the unit in flight; rerunning asks ``done()`` which units exist and runs the rest, so
no row is lost or duplicated. A half-written last line (a crash mid-write) is dropped on
load.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path

import pandas as pd

# List-valued columns (token ids, probabilities) are stored as JSON text.
LIST_COLUMNS = ("output_ids", "output_probs")


def _encode(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for column in frame.columns:
        if column in LIST_COLUMNS or frame[column].map(lambda v: isinstance(v, (list, tuple))).any():
            frame[column] = frame[column].map(json.dumps)
    return frame


def decode_lists(frame: pd.DataFrame) -> pd.DataFrame:
    """Turn JSON list columns read back from CSV into Python lists."""
    for column in LIST_COLUMNS:
        if column in frame.columns:
            frame[column] = frame[column].map(lambda v: json.loads(v) if isinstance(v, str) else v)
    return frame


class ResultStore:
    def __init__(self, path: str | Path, unit_columns: Sequence[str]):
        self.path = Path(path)
        self.unit_columns = list(unit_columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_partial_line()

    def _drop_partial_line(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            self.path.write_bytes(data[: data.rfind(b"\n") + 1])

    def load(self) -> pd.DataFrame:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return pd.DataFrame()
        return decode_lists(pd.read_csv(self.path, keep_default_na=False, na_values=[]))

    def done(self) -> set[tuple]:
        """Units already written, as tuples of ``unit_columns`` values (as strings)."""
        frame = self.load()
        if frame.empty:
            return set()
        return set(frame[self.unit_columns].astype(str).itertuples(index=False, name=None))

    @staticmethod
    def key(values: Iterable[Hashable]) -> tuple:
        return tuple(str(v) for v in values)

    def append(self, frame: pd.DataFrame) -> None:
        """Append one finished unit's rows durably (header on the first write)."""
        if frame.empty:
            return
        write_header = not self.path.exists() or self.path.stat().st_size == 0
        if not write_header:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f))
            if header != list(frame.columns):
                frame = frame.reindex(columns=header)
        buffer = io.StringIO()
        _encode(frame).to_csv(buffer, index=False, header=write_header)
        with open(self.path, "a", newline="") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
