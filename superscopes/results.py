"""Result tables: resumable stores that cannot mix settings, and typed CSV/Parquet round-trips.

A ``ResultStore`` grows one finished unit (e.g. one source prompt's cells) at a time. Its
record of truth is a journal, ``<name>.journal``: one line per appended unit, framed as
``<byte length> <sha256 prefix> <JSON>`` and fsynced before anything else is written, so a
write cut at any byte loses at most the unit being written (a torn or corrupt line fails
its length or hash and is dropped; that unit is redone). Beside it:

- ``<name>`` itself (``cells.csv``), the table users open: rebuilt from the journal whenever
  it disagrees with it (a cut append, an edit), so it always holds exactly the finished
  units. Deleting it starts the store over.
- ``<name>.meta.json``: the *settings* that produced it (model, grid, prompts, seed, ...)
  plus the package version. Reopening with the same settings resumes; with other settings
  it refuses and names what differs (``on_mismatch="new"`` writes to a sibling file keyed by
  the settings' fingerprint instead), so a rerun with other alphas never reuses rows it did
  not compute. It also lists the finished units with their row counts, so a CSV and its
  record copied without the journal (a commit of ``results/``) still resume, and the
  *column types*, so values come back as written (``output_ids`` a list of ints, booleans
  as booleans, a readout "1135" as text).
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

from superscopes.sites import ScopeError

# Columns whose cells are lists (token ids, probabilities): JSON text in CSV.
LIST_COLUMNS = ("output_ids", "output_probs")
# Result columns that are text even when every value looks like a number ("1135").
TEXT_COLUMNS = (
    "model",
    "target_model",
    "source",
    "token",
    "site",
    "target",
    "target_site",
    "transform",
    "mode",
    "output",
    "best",
)
TABLE_SUFFIXES = (".csv", ".parquet")


class SettingsMismatchError(ValueError):
    """A store on disk was made with other settings than this run's."""


class StoreReadError(ValueError):
    """A store's record on disk cannot be read; the message names the file."""


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


def _missing(value) -> bool:
    """None, NaN or pd.NA: what a list column holds for a row of a unit that lacks it."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _csv_rows(rows: Iterable[Sequence[str]]) -> str:
    """Rows as CSV text, one ``\n`` per row. Python's writer quotes a field only for the line
    terminator's characters, so a lone carriage return (a token some tokenizers decode to)
    would go out bare and split the row for every reader: such rows have all fields quoted."""
    out = io.StringIO()
    plain, quoted = csv.writer(out, lineterminator="\n"), csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for row in rows:
        (quoted if any("\r" in str(field) for field in row) else plain).writerow(row)
    return out.getvalue()


def _encode(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for column in frame.columns:
        if _kind(frame[column]) == "list":
            frame[column] = frame[column].map(lambda v: "" if _missing(v) else json.dumps(list(v)))
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
        path.write_text(_csv_rows([list(map(str, frame.columns)), *_text_rows(frame)]), newline="")


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
    if (
        path.is_dir()
        or (path.exists() and not os.access(path, os.W_OK))
        or not folder.is_dir()
        or not os.access(folder, os.W_OK)
    ):
        raise ValueError(f"output {str(path)!r} is not writable")


# ---------------------------------------------------------------- settings


def _plain(value):
    """Settings as JSON values, so tuples, ranges and numpy numbers compare as written."""
    return json.loads(
        json.dumps(
            value,
            default=lambda v: (
                v.tolist() if hasattr(v, "tolist") else list(v) if isinstance(v, (range, set, frozenset)) else str(v)
            ),
        )
    )


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


def _read_meta_file(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise StoreReadError(
            f"{path} is not a readable store record ({error}); restore it, or delete it with its table to start over"
        ) from None
    if not isinstance(meta, dict):
        raise StoreReadError(
            f"{path} is not a readable store record (a JSON object); restore it, or delete it with "
            "its table to start over"
        )
    return meta


def _frame_line(record: dict) -> bytes:
    """One journal line: ``<length> <hash> <payload>``; ASCII JSON holds no newline of its own."""
    payload = json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode()
    return b"%d %s %s\n" % (len(payload), hashlib.sha256(payload).hexdigest()[:32].encode(), payload)


def _parse_line(line: bytes) -> dict | None:
    """The record a journal line holds, or None when it is torn or corrupt."""
    parts = line.split(b" ", 2)
    if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) != len(parts[2]):
        return None
    if hashlib.sha256(parts[2]).hexdigest()[:32].encode() != parts[1]:
        return None
    try:
        record = json.loads(parts[2])
    except ValueError:
        return None
    ok = isinstance(record, dict) and {"units", "columns", "rows"} <= set(record)
    return record if ok else None


def _read_journal(path: Path) -> tuple[list[dict], bool]:
    """The intact records of a journal, and whether anything else (a torn tail, a corrupt line) is in it."""
    data = path.read_bytes() if path.exists() else b""
    lines = data.split(b"\n")
    records = [record for line in lines[:-1] if (record := _parse_line(line)) is not None]
    return records, len(records) != len(lines) - 1 or lines[-1] != b""


def _text_rows(frame: pd.DataFrame) -> list[list[str]]:
    """Each cell as the CSV text it is written as (lists as JSON, missing values empty)."""
    # CRLF lines make the writer quote fields holding a carriage return, so each row reads back whole.
    return list(csv.reader(io.StringIO(_encode(frame).to_csv(index=False, lineterminator="\r\n"))))[1:]


def _columns(records: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(column for record in records for column in record["columns"]))


def _csv_text(records: Sequence[dict]) -> str:
    """The table of ``records``: one header, the union of their columns in order of appearance."""
    if not records:
        return ""
    columns = _columns(records)
    return _csv_rows([columns, *(row for record in records for row in _reorder(record, columns))])


def _reorder(record: dict, columns: Sequence[str]) -> list[list[str]]:
    where = {column: i for i, column in enumerate(record["columns"])}
    return [[row[where[c]] if c in where else "" for c in columns] for row in record["rows"]]


def _kinds(records: Sequence[dict], recorded: Mapping[str, str]) -> dict[str, str]:
    """``recorded`` plus the kinds of columns only the journal knows (the first kind a column had)."""
    kinds = dict(recorded)
    for record in records:
        for column, kind in record.get("kinds", {}).items():
            kinds.setdefault(column, kind)
    return kinds


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably: a kill leaves the old file or the new one."""
    partial = path.with_name(path.name + ".part")
    with open(partial, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


class ResultStore:
    """A resumable table of finished units; see the module docstring.

    ``settings``: what produced the rows (``None`` opens any store, for reading).
    ``on_mismatch``: ``"refuse"`` (raise ``SettingsMismatchError``) or ``"new"`` (use
    ``<stem>-<fingerprint><suffix>`` beside it)."""

    def __init__(
        self,
        path: str | Path,
        unit_columns: Sequence[str],
        settings: Mapping[str, object] | None = None,
        on_mismatch: Literal["refuse", "new"] = "refuse",
    ):
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
            differs = (
                settings_diff(meta["settings"], self.settings)
                if meta.get("settings")
                else ["no settings are recorded for it (made by an older version)"]
            )
            raise SettingsMismatchError(
                f"{self.path} was made with other settings ({'; '.join(differs)}); "
                "use another output folder, delete it, or ask for a new file"
            )
        if meta and meta.get("unit_columns", self.unit_columns) != self.unit_columns:
            raise ValueError(f"{self.path} records units by {meta['unit_columns']}, not {self.unit_columns}")
        self._meta = {
            "settings": meta.get("settings") if self.settings is None else _plain(self.settings),
            "unit_columns": self.unit_columns,
            "units": meta.get("units", []),
            "kinds": meta.get("kinds", {}),
        }
        # A table without a record or journal (older versions, or written by hand) is only read, never
        # pruned, until something is appended to it.
        self._records: list[dict] | None = None
        if meta or self.journal_path.exists():
            self._records = self._open_journal()
            self._sync()

    @property
    def meta_path(self) -> Path:
        return self.path.with_name(self.path.name + ".meta.json")

    @property
    def journal_path(self) -> Path:
        return self.path.with_name(self.path.name + ".journal")

    def _read_meta(self) -> dict:
        return _read_meta_file(self.meta_path)

    def _write_meta(self) -> None:
        write_atomic(self.meta_path, json.dumps(self._meta).encode())

    def _has_rows(self) -> bool:
        """Rows in the table, or in its journal (a CSV cut short still belongs to its settings)."""
        if not self.path.exists():
            return False
        return self.path.stat().st_size > 0 or (self.journal_path.exists() and self.journal_path.stat().st_size > 0)

    def _open_journal(self) -> list[dict]:
        """The finished units' records: the journal's intact lines, or those of an older CSV store."""
        if not self.path.exists():  # the table was deleted: nothing it recorded is done
            self.journal_path.unlink(missing_ok=True)
            return []
        if self.journal_path.exists():
            records, damaged = _read_journal(self.journal_path)
            if damaged:  # drop the torn tail now, so the next record starts on a line of its own
                write_atomic(self.journal_path, b"".join(_frame_line(record) for record in records))
            return records
        records = self._finished_csv_rows()  # a CSV store of an older version, or a committed one
        write_atomic(self.journal_path, b"".join(_frame_line(record) for record in records))
        return records

    def _finished_csv_rows(self) -> list[dict]:
        """As one record, the CSV's rows of recorded units whose rows are all on disk."""
        data = self.path.read_bytes()
        frame = _read_csv(data[: data.rfind(b"\n") + 1], self._meta["kinds"])  # a crash mid-write leaves a half line
        recorded = Counter({tuple(unit): rows for *unit, rows in self._meta["units"]})
        keys = self._unit_keys(frame)
        on_disk = Counter(keys)
        finished = {unit for unit, rows in recorded.items() if on_disk[unit] == rows}
        kept = frame[[key in finished for key in keys]]
        return [self._record(kept)] if len(kept) else []

    def _record(self, frame: pd.DataFrame) -> dict:
        units = Counter(self._unit_keys(frame))
        # Each record carries its columns' kinds: a kill before the .meta.json write loses no type.
        return {
            "units": [[*unit, rows] for unit, rows in units.items()],
            "columns": [str(c) for c in frame.columns],
            "kinds": {str(c): _kind(frame[c]) for c in frame.columns},
            "rows": _text_rows(frame),
        }

    def _sync(self) -> None:
        """Make the CSV and the record's unit list say what the journal says."""
        text = _csv_text(self._records).encode()
        if not self.path.exists() or self.path.read_bytes() != text:
            write_atomic(self.path, text)
        units = [[*unit, rows] for unit, rows in self._recorded().items()]
        kinds = _kinds(self._records, self._meta["kinds"])
        if units != self._meta["units"] or kinds != self._meta["kinds"] or not self.meta_path.exists():
            self._meta["units"], self._meta["kinds"] = units, kinds
            self._write_meta()

    def _recorded(self) -> Counter:
        return sum(
            (Counter({tuple(unit): rows for *unit, rows in record["units"]}) for record in self._records or []),
            Counter(),
        )

    def _unit_keys(self, frame: pd.DataFrame) -> list[tuple]:
        if not self.unit_columns:  # the whole table is one unit
            return [()] * len(frame)
        return list(frame[self.unit_columns].astype(str).itertuples(index=False, name=None))

    def load(self) -> pd.DataFrame:
        if self._records is None:
            data = self.path.read_bytes() if self.path.exists() else b""
            return _read_csv(data[: data.rfind(b"\n") + 1], self._meta["kinds"])
        return _read_csv(_csv_text(self._records).encode(), self._meta["kinds"])

    @staticmethod
    def read(path: str | Path) -> pd.DataFrame:
        """A store's rows with their recorded types, without opening it for writing."""
        path = Path(path)
        kinds = _read_meta_file(path.with_name(path.name + ".meta.json")).get("kinds")
        journal = path.with_name(path.name + ".journal")
        if path.exists() and journal.exists():
            records = _read_journal(journal)[0]
            return _read_csv(_csv_text(records).encode(), _kinds(records, kinds or {}))
        data = path.read_bytes() if path.exists() else b""
        return _read_csv(data[: data.rfind(b"\n") + 1], kinds)

    def done(self) -> set[tuple]:
        """Finished units, as tuples of ``unit_columns`` values (as strings)."""
        return set(self._recorded())

    @staticmethod
    def key(values: Iterable[Hashable]) -> tuple:
        return tuple(str(v) for v in values)

    def append(self, frame: pd.DataFrame) -> None:
        """Append finished units' rows: first durably to the journal, then to the CSV and the record."""
        if frame.empty:
            return
        if self._records is None:  # a table without a record: its rows become the first record
            self._records = [self._record(self.load())] if self._has_rows() else []
            write_atomic(self.journal_path, b"".join(_frame_line(record) for record in self._records))
        record = self._record(frame)
        self._meta["kinds"] = {**record["kinds"], **self._meta["kinds"]}
        with open(self.journal_path, "ab") as f:
            f.write(_frame_line(record))
            f.flush()
            os.fsync(f.fileno())
        header = _columns(self._records)
        self._records.append(record)
        if header and self.path.exists() and self.path.stat().st_size > 0 and _columns(self._records) == header:
            with open(self.path, "a", newline="") as f:
                f.write(_csv_rows(_reorder(record, header)))
                f.flush()
                os.fsync(f.fileno())
            self._meta["units"] = [[*unit, rows] for unit, rows in self._recorded().items()]
            self._write_meta()
        else:  # the first unit, or new columns: the whole table, with the widened header
            self._sync()


class Checkpoint:
    """Finished cells of one grid (``superscopes.run(..., checkpoint=PATH)``), one JSON line per
    request as it returns (fsynced), under a header line with the grid's fingerprint: a rerun
    resumes, a different grid is refused."""

    def __init__(self, path: str | Path, fingerprint: str, n_cells: int) -> None:
        self.path = Path(path)
        self.header = {"fingerprint": fingerprint, "cells": n_cells}
        if self.path.exists() and self.path.stat().st_size:
            first = self.path.read_text().splitlines()[0]
            found = json.loads(first) if first.startswith("{") else {}
            if found.get("fingerprint") != fingerprint:
                raise ScopeError(
                    f"checkpoint {self.path} holds another grid (fingerprint {found.get('fingerprint')!r}, "
                    f"this grid {fingerprint!r}): give a new checkpoint path, or delete it to start over"
                )
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write([self.header])

    def load(self) -> dict[int, dict]:
        done = {}
        for line in self.path.read_text().splitlines()[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut off mid-write: its request is redone
                continue
            done.update({int(i): out for i, out in record["cells"].items()})
        return done

    def append(self, chosen: list[int], outputs: list[dict]) -> None:
        self._write([{"cells": {str(i): out for i, out in zip(chosen, outputs)}}])

    def _write(self, records: list[dict]) -> None:
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
