"""Runs kept across page reloads and server restarts: one SQLite file under the cache folder.

Each run is one row: its id (the job id, 12 hex digits), when it was made, a short summary for
the history list, and its whole state (settings, grid, rows, controls) and CSV, zlib-packed.
The store is bounded: at most ``keep`` runs and ``max_bytes`` of packed data (the oldest go
first), and a run over ``max_run_bytes`` keeps its settings but not its results. Every query is
parameterised; ids are checked before any query."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import zlib
from contextlib import closing
from pathlib import Path

RUN_ID = re.compile(r"[0-9a-f]{12}")
KEEP_RUNS = 200
MAX_STORE_BYTES = 64 * 2**20
MAX_RUN_BYTES = 4 * 2**20
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    status TEXT NOT NULL,
    summary TEXT NOT NULL,
    state BLOB NOT NULL,
    csv BLOB,
    size INTEGER NOT NULL
)"""


def default_path() -> Path:
    from superscopes.models import cache_dir

    return cache_dir() / "app" / "runs.sqlite"


def check_run_id(run_id: str) -> str:
    """``run_id`` if it is a run id (12 characters from 0-9 and a-f), else ValueError."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        shown = repr(run_id) if len(repr(run_id)) <= 40 else repr(run_id)[:37] + "..."
        raise ValueError(f"run id {shown} is not valid: a run id is 12 characters from 0-9 and a-f")
    return run_id


def _pack(value) -> bytes:
    return zlib.compress(json.dumps(value, allow_nan=False).encode(), 6)


def _unpack(blob: bytes):
    return json.loads(zlib.decompress(blob))


class RunStore:
    """Finished and started runs in ``path`` (created with its folder on first use)."""

    def __init__(self, path: str | Path, keep: int = KEEP_RUNS, max_bytes: int = MAX_STORE_BYTES,
                 max_run_bytes: int = MAX_RUN_BYTES):  # fmt: skip
        self.path = Path(path)
        self.keep, self.max_bytes, self.max_run_bytes = keep, max_bytes, max_run_bytes
        self.lock = threading.Lock()  # one writer at a time (the worker and request threads)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._db()) as db, db:
            db.execute(SCHEMA)
            # A run that was queued or running when the server stopped will not finish now.
            db.execute("UPDATE runs SET status = 'interrupted' WHERE status IN ('queued', 'running')")

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    def save(self, run_id: str, created: float, status: str, summary: dict, state: dict,
             csv: bytes | None = None) -> bool:  # fmt: skip
        """Insert or replace one run, then evict the oldest beyond the bounds; False if its
        results were too large to keep (its settings are kept)."""
        check_run_id(run_id)
        packed, packed_csv = _pack(state), zlib.compress(csv, 6) if csv is not None else None
        whole = len(packed) + len(packed_csv or b"") <= self.max_run_bytes
        if not whole:
            light = {k: v for k, v in state.items() if k not in ("rows", "controls")}
            packed, packed_csv = _pack({**light, "rows": [], "controls": [], "dropped": True}), None
        size = len(packed) + len(packed_csv or b"")
        with self.lock, closing(self._db()) as db, db:
            db.execute(
                "INSERT OR REPLACE INTO runs (id, created, status, summary, state, csv, size) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, created, status, json.dumps(summary), packed, packed_csv, size),
            )
            kept, total, drop = 0, 0, []
            for old_id, old_size in db.execute("SELECT id, size FROM runs ORDER BY created DESC, id"):
                kept, total = kept + 1, total + old_size
                if old_id != run_id and (kept > self.keep or total > self.max_bytes):
                    drop.append((old_id,))
            db.executemany("DELETE FROM runs WHERE id = ?", drop)
        return whole

    def state(self, run_id: str) -> dict | None:
        with closing(self._db()) as db:
            found = db.execute("SELECT state FROM runs WHERE id = ?", (check_run_id(run_id),)).fetchone()
        return _unpack(found[0]) if found else None

    def csv(self, run_id: str) -> bytes | None:
        with closing(self._db()) as db:
            found = db.execute("SELECT csv FROM runs WHERE id = ?", (check_run_id(run_id),)).fetchone()
        return zlib.decompress(found[0]) if found and found[0] is not None else None

    def recent(self, limit: int, kind: str = "grid") -> list[dict]:
        """The newest ``limit`` runs of ``kind`` (``grid``, or a panel job's kind named in its
        summary), newest first."""
        with closing(self._db()) as db:
            rows = db.execute("SELECT id, created, status, summary FROM runs "
                              "WHERE coalesce(json_extract(summary, '$.kind'), 'grid') = ? "
                              "ORDER BY created DESC, id LIMIT ?", (kind, limit)).fetchall()  # fmt: skip
        return [{"id": i, "created": c, "status": s, **json.loads(summary)} for i, c, s, summary in rows]

    def __len__(self) -> int:
        with closing(self._db()) as db:
            return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
