"""Result tables: resumable stores that cannot mix settings, and typed CSV/Parquet round-trips.

A ``ResultStore`` is a CSV that grows one finished unit (e.g. one source prompt's cells) at
a time, with a sidecar ``<name>.meta.json`` holding

- the *settings* that produced it (model, grid, prompts, seed, ...) plus the package
  version. Reopening with the same settings resumes; with other settings it refuses and
  names what differs (``on_mismatch="new"`` writes to a sibling file keyed by the settings'
  fingerprint instead), so a rerun with other alphas never reuses rows it did not compute.
- the *finished units* and their row counts, recorded after the unit's rows are fsynced. A
  unit is done only when it is recorded and all of its rows are on disk; rows of a unit cut
  off part-way (a kill between rows and record, a half-written line) are dropped on open and
  the unit is redone, so no row is lost or duplicated.
- the *column types*, so values come back as written (``output_ids`` a list of ints,
  booleans as booleans, a readout "1135" as text).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import pandas as pd

# Columns whose cells are lists (token ids, probabilities): JSON text in CSV.
LIST_COLUMNS = ("output_ids", "output_probs")
# Result columns that are text even when every value looks like a number ("1135").
TEXT_COLUMNS = ("model", "target_model", "source", "token", "site", "target", "target_site", "transform", "mode",
                "output", "best")  # fmt: skip
TABLE_SUFFIXES = (".csv", ".parquet")


class SettingsMismatchError(ValueError):
    """A store on disk was made with other settings than this run's."""


# ---------------------------------------------------------------- column types


def _kind(series: pd.Series) -> str:
    """One of list, bool, int, float, str: how a column is written and read back."""
    if series.name in LIST_COLUMNS or series.map(lambda v: isinstance(v, (list, tuple))).any():
        return "list"
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_integer_dtype(series):
        return "int"
    if pd.api.types.is_float_dtype(series):
        return "float"
    return "str"


def _from_text(values: pd.Series, kind: str) -> pd.Series:
    """CSV text (read with ``dtype=str``) back to ``kind``; empty cells are missing values."""
    if kind == "str":
        return values
    if kind == "list":
        return values.map(lambda v: json.loads(v) if v else None)
    if kind == "bool":
        return values.map({"True": True, "False": False, "": None}).astype("boolean" if (values == "").any() else bool)
    numbers = pd.to_numeric(values.replace("", math.nan))
    if kind == "int":
        return numbers.astype("Int64" if numbers.isna().any() else "int64")
    return numbers.astype(float)


def _encode(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for column in frame.columns:
        if _kind(frame[column]) == "list":
            frame[column] = frame[column].map(lambda v: json.dumps(list(v)) if v is not None else "")
    return frame


def _read_csv(data: bytes, kinds: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Read as text, then give each column its kind: recorded, known, or as pandas infers it."""
    if not data.strip():
        return pd.DataFrame()
    frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, na_values=[])
    inferred = pd.read_csv(io.BytesIO(data), keep_default_na=False)
    for column in frame.columns:
        kind = (kinds or {}).get(column)
        if kind is None:
            kind = "list" if column in LIST_COLUMNS else "str" if column in TEXT_COLUMNS else _kind(inferred[column])
        frame[column] = _from_text(frame[column], kind)
    return frame


def save_table(frame: pd.DataFrame, path: str | Path) -> None:
    """CSV or Parquet by extension; ``read_table`` gives back the same values and types."""
    path = Path(path)
    check_table_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        _encode(frame).to_csv(path, index=False)


def read_table(path: str | Path) -> pd.DataFrame:
    """A table written by ``save_table`` (or any CSV/Parquet), list columns as Python lists."""
    path = str(path)
    try:
        if path.endswith(".parquet"):
            frame = pd.read_parquet(path)
            for column in frame.columns:  # Parquet lists come back as numpy arrays
                if frame[column].map(lambda v: hasattr(v, "tolist") and not isinstance(v, str)).any():
                    frame[column] = frame[column].map(lambda v: v.tolist() if v is not None else None)
            return frame
        return _read_csv(Path(path).read_bytes())
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise ValueError(f"cannot read {path!r} as a table: {error}") from None


def check_table_path(path: str | Path) -> None:
    """A known table extension, in a folder we can write (checked before any long run)."""
    path = Path(path)
    if path.suffix not in TABLE_SUFFIXES:
        raise ValueError(f"output {str(path)!r} has extension {path.suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")
    folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if path.is_dir() or (path.exists() and not os.access(path, os.W_OK)) or not folder.is_dir() \
            or not os.access(folder, os.W_OK):  # fmt: skip
        raise ValueError(f"output {str(path)!r} is not writable")


# ---------------------------------------------------------------- settings


def _plain(value):
    """Settings as JSON values, so tuples, ranges and numpy numbers compare as written."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else list(v)
                                 if isinstance(v, (range, set, frozenset)) else str(v)))  # fmt: skip


def fingerprint(settings: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(_plain(dict(settings)), sort_keys=True).encode()).hexdigest()[:12]


def settings_diff(old: Mapping[str, object], new: Mapping[str, object]) -> list[str]:
    """``name: on disk X, now Y`` for each setting that differs."""
    old, new = _plain(dict(old)), _plain(dict(new))
    return [
        f"{key}: on disk {old.get(key, '(not set)')!r}, now {new.get(key, '(not set)')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def _with_version(settings: Mapping[str, object]) -> dict[str, object]:
    from superscopes import __version__

    return {**settings, "superscopes_version": __version__}


# ---------------------------------------------------------------- the store


class ResultStore:
    """A resumable CSV of finished units; see the module docstring.

    ``settings``: what produced the rows (``None`` opens any store, for reading).
    ``on_mismatch``: ``"refuse"`` (raise ``SettingsMismatchError``) or ``"new"`` (use
    ``<stem>-<fingerprint><suffix>`` beside it)."""

    def __init__(self, path: str | Path, unit_columns: Sequence[str], settings: Mapping[str, object] | None = None,
                 on_mismatch: Literal["refuse", "new"] = "refuse"):  # fmt: skip
        self.path = Path(path)
        self.unit_columns = list(unit_columns)
        self.settings = None if settings is None else _with_version(settings)
        if on_mismatch not in ("refuse", "new"):
            raise ValueError(f"on_mismatch {on_mismatch!r} is not valid; choose from refuse, new")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = self._read_meta()
        if self.settings is not None and self._has_rows() and meta.get("settings") != _plain(self.settings):
            if on_mismatch == "new":
                self.path = self.path.with_name(f"{self.path.stem}-{fingerprint(self.settings)}{self.path.suffix}")
                return self.__init__(self.path, unit_columns, settings, "refuse")
            differs = settings_diff(meta["settings"], self.settings) if meta.get("settings") else [
                "no settings are recorded for it (made by an older version)"]  # fmt: skip
            raise SettingsMismatchError(
                f"{self.path} was made with other settings ({'; '.join(differs)}); "
                "use another output folder, delete it, or ask for a new file"
            )
        if meta and meta.get("unit_columns", self.unit_columns) != self.unit_columns:
            raise ValueError(f"{self.path} records units by {meta['unit_columns']}, not {self.unit_columns}")
        self._meta = {"settings": meta.get("settings") if self.settings is None else _plain(self.settings),
                      "unit_columns": self.unit_columns, "units": meta.get("units", []),
                      "kinds": meta.get("kinds", {})}  # fmt: skip
        if meta:  # a table without a record (older versions, or written by hand) is only read, never pruned
            self._drop_unfinished()

    @property
    def meta_path(self) -> Path:
        return self.path.with_name(self.path.name + ".meta.json")

    def _read_meta(self) -> dict:
        return json.loads(self.meta_path.read_text()) if self.meta_path.exists() else {}

    def _write_meta(self) -> None:
        # Atomic: a kill leaves either the old or the new record, never a torn one.
        partial = self.meta_path.with_name(self.meta_path.name + ".part")
        partial.write_text(json.dumps(self._meta))
        os.replace(partial, self.meta_path)

    def _has_rows(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > 0

    def _read(self) -> pd.DataFrame:
        if not self._has_rows():
            return pd.DataFrame()
        data = self.path.read_bytes()
        return _read_csv(data[: data.rfind(b"\n") + 1], self._meta["kinds"])  # a crash mid-write leaves a half line

    def _header(self) -> list[str]:
        if not self._has_rows():
            return []
        with open(self.path, newline="") as f:
            return next(csv.reader(f))

    def _recorded(self) -> Counter:
        return Counter({tuple(unit): rows for *unit, rows in self._meta["units"]})

    def _unit_keys(self, frame: pd.DataFrame) -> list[tuple]:
        if not self.unit_columns:  # the whole table is one unit
            return [()] * len(frame)
        return list(frame[self.unit_columns].astype(str).itertuples(index=False, name=None))

    def _drop_unfinished(self) -> None:
        """Keep only rows of recorded units whose rows are all on disk; rewrite if any went."""
        if not self._has_rows():  # the table was deleted: nothing it recorded is done
            if self._meta["units"]:
                self._meta["units"] = []
                self._write_meta()
            return
        frame, recorded = self._read(), self._recorded()
        keys = self._unit_keys(frame)
        on_disk = Counter(keys)
        finished = {unit for unit, rows in recorded.items() if on_disk[unit] == rows}
        keep = [key in finished for key in keys]
        if all(keep) and finished == set(recorded) and self.path.read_bytes().endswith(b"\n"):
            return
        self._meta["units"] = [[*unit, rows] for unit, rows in recorded.items() if unit in finished]
        self._rewrite(frame[keep])

    def _rewrite(self, frame: pd.DataFrame) -> None:
        partial = self.path.with_name(self.path.name + ".part")
        partial.write_text(_encode(frame).to_csv(index=False) if len(frame) else "")
        os.replace(partial, self.path)
        self._write_meta()

    def load(self) -> pd.DataFrame:
        return self._read()

    @staticmethod
    def read(path: str | Path) -> pd.DataFrame:
        """A store's rows with their recorded types, without opening it for writing."""
        path = Path(path)
        meta_path = path.with_name(path.name + ".meta.json")
        kinds = json.loads(meta_path.read_text()).get("kinds") if meta_path.exists() else None
        data = path.read_bytes() if path.exists() else b""
        return _read_csv(data[: data.rfind(b"\n") + 1], kinds)

    def done(self) -> set[tuple]:
        """Finished units, as tuples of ``unit_columns`` values (as strings)."""
        return set(self._recorded())

    @staticmethod
    def key(values: Iterable[Hashable]) -> tuple:
        return tuple(str(v) for v in values)

    def append(self, frame: pd.DataFrame) -> None:
        """Append one finished unit's rows durably, then record the unit as done."""
        if frame.empty:
            return
        self._meta["kinds"] = {**{c: _kind(frame[c]) for c in frame.columns}, **self._meta["kinds"]}
        header = self._header()
        if header and not set(frame.columns) <= set(header):  # new columns: widen the file, keep them
            self._rewrite(pd.concat([self._read(), frame], ignore_index=True))
        else:
            body = _encode(frame.reindex(columns=header) if header else frame)
            with open(self.path, "a", newline="") as f:
                f.write(body.to_csv(index=False, header=not header))
                f.flush()
                os.fsync(f.fileno())
        recorded = self._recorded() + Counter(self._unit_keys(frame))
        self._meta["units"] = [[*unit, rows] for unit, rows in recorded.items()]
        self._write_meta()
