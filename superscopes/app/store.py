"""Runs kept across page reloads and server restarts: one SQLite file under the cache folder.

Each run is one row: its id (the job id, 12 hex digits), when it was made, a short summary for
the history list, and its whole state (settings, grid, rows, controls) and CSV, zlib-packed.
The store is bounded: at most ``keep`` runs and ``max_bytes`` of packed data (the oldest go
first), and a run over ``max_run_bytes`` keeps its settings but not its results. Every query is
parameterised; ids are checked before any query.

Faults: the file is in WAL mode (SQLite's checksummed log: a cut write loses at most the
transaction in progress, and readers never wait for a writer). A request never waits on the
file: ``save_later`` hands a snapshot to a writer thread that retries while another process
holds the file locked, newest snapshot per run last; reads see snapshots not yet written, and a
locked or unreadable file is a ``RunStoreError`` (the server's 503), not a stall. A file that
is not a readable database is moved aside, with a message naming both paths, and a new one
started. A run that was queued or running in an earlier process reads as ``interrupted``,
with the rows of every chunk saved before it stopped."""

from __future__ import annotations

import json
import re
import sqlite3
import sys
import threading
import time
import zlib
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
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


class RunStoreError(RuntimeError):
    """The file is locked by another process, or unreadable: try again, or see the message."""


BUSY_TIMEOUT = 0.25  # seconds a query waits on another process's lock before it gives up
STOPPED = ("queued", "running")  # a run in one of these in an earlier process was cut off


def _busy(error: sqlite3.Error) -> bool:
    return "locked" in str(error) or "busy" in str(error)


@dataclass(frozen=True)
class Snapshot:
    """One run as the store keeps it; ``csv`` may be a callable, called when the snapshot is
    written (the writer thread, not the request, pays for rendering the table)."""

    created: float
    status: str
    summary: dict
    state: dict
    csv: bytes | Callable[[], bytes | None] | None = None


class RunStore:
    """Finished and started runs in ``path`` (created with its folder on first use)."""

    def __init__(
        self,
        path: str | Path,
        keep: int = KEEP_RUNS,
        max_bytes: int = MAX_STORE_BYTES,
        max_run_bytes: int = MAX_RUN_BYTES,
    ):
        self.path = Path(path)
        self.keep, self.max_bytes, self.max_run_bytes = keep, max_bytes, max_run_bytes
        self.lock = threading.Lock()  # one writer at a time (the writer thread and synchronous saves)
        self.pending: dict[str, tuple[int, Snapshot]] = {}  # run id -> (sequence, snapshot) not yet written
        self.sequence = 0
        self.changed = threading.Condition()  # guards pending and sequence
        self.ours: set[str] = set()  # runs saved by this process: their queued/running is live
        self.moved_aside: Path | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer: threading.Thread | None = None  # started by the first save_later
        self._open()

    def _open(self) -> None:
        """Create the table; move a file that is not a readable database aside and start anew."""
        try:
            with closing(self._db(timeout=5)) as db, db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(SCHEMA)
                if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise sqlite3.DatabaseError("database disk image is malformed (quick_check)")
        except sqlite3.DatabaseError as error:
            if _busy(error):  # locked by another process: its reads and our writer's retries will do
                return
            self.moved_aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                part = Path(f"{self.path}{suffix}")
                if part.exists():
                    part.replace(f"{self.moved_aside}{suffix}")
            print(
                f"superscopes app: the run store {self.path} was unreadable ({error}); moved it to "
                f"{self.moved_aside} and started a new one",
                file=sys.stderr,
            )
            with closing(self._db()) as db, db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(SCHEMA)

    def _db(self, timeout: float = BUSY_TIMEOUT) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=timeout)

    def _query(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        try:
            with closing(self._db()) as db:
                return db.execute(sql, parameters).fetchall()
        except sqlite3.Error as error:
            why = "locked by another process" if _busy(error) else f"unreadable ({error})"
            raise RunStoreError(f"the run store {self.path} is {why}; try again in a moment") from None

    def save(self, run_id: str, snapshot: Snapshot) -> bool:
        """Insert or replace one run, then evict the oldest beyond the bounds; False if its
        results were too large to keep (its settings are kept). ``RunStoreError`` if locked."""
        check_run_id(run_id)
        with self.lock:
            return self._save(run_id, snapshot)

    def _save(self, run_id: str, snapshot: Snapshot) -> bool:
        state, csv = snapshot.state, snapshot.csv() if callable(snapshot.csv) else snapshot.csv
        packed, packed_csv = _pack(state), zlib.compress(csv, 6) if csv is not None else None
        whole = len(packed) + len(packed_csv or b"") <= self.max_run_bytes
        if not whole:
            light = {k: v for k, v in state.items() if k not in ("rows", "controls")}
            packed, packed_csv = _pack({**light, "rows": [], "controls": [], "dropped": True}), None
        size = len(packed) + len(packed_csv or b"")
        row = (run_id, snapshot.created, snapshot.status, json.dumps(snapshot.summary), packed, packed_csv, size)
        try:
            with closing(self._db()) as db, db:
                db.execute(
                    "INSERT OR REPLACE INTO runs (id, created, status, summary, state, csv, size) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                kept, total, drop = 0, 0, []
                for old_id, old_size in db.execute("SELECT id, size FROM runs ORDER BY created DESC, id"):
                    kept, total = kept + 1, total + old_size
                    if old_id != run_id and (kept > self.keep or total > self.max_bytes):
                        drop.append((old_id,))
                db.executemany("DELETE FROM runs WHERE id = ?", drop)
        except sqlite3.Error as error:
            why = "locked by another process" if _busy(error) else f"unreadable ({error})"
            raise RunStoreError(f"the run store {self.path} is {why}; run {run_id} is saved when it can be") from None
        self.ours.add(run_id)
        return whole

    def save_later(self, run_id: str, snapshot: Snapshot) -> None:
        """Hand the snapshot to the writer thread and return at once (a request never waits on the file)."""
        check_run_id(run_id)
        with self.changed:
            self.sequence += 1
            self.pending[run_id] = (self.sequence, snapshot)
            self.ours.add(run_id)
            if self.writer is None:
                self.writer = threading.Thread(target=self._writer, name="superscopes-run-store", daemon=True)
                self.writer.start()
            self.changed.notify()

    def save_now(self, run_id: str, snapshot: Snapshot) -> bool:
        """``save_later``, then one try to write it at once; True if it is on disk."""
        self.save_later(run_id, snapshot)
        return self._write(run_id)

    def _write(self, run_id: str) -> bool:
        """Write the run's newest pending snapshot; False while the file is locked."""
        with self.lock:  # held while picking and writing, so an older snapshot never overwrites a newer one
            with self.changed:
                item = self.pending.get(run_id)
            if item is None:
                return True
            sequence, snapshot = item
            try:
                self._save(run_id, snapshot)
            except Exception as error:  # the writer thread must outlive any one snapshot
                if isinstance(error, RunStoreError) and "locked" in str(error):
                    return False
                print(f"superscopes app: run {run_id} not kept: {error}", file=sys.stderr)  # dropped, not retried
            with self.changed:
                if self.pending.get(run_id, (None,))[0] == sequence:
                    del self.pending[run_id]
        return True

    def _writer(self) -> None:
        delay = 0.05
        while True:
            with self.changed:
                while not self.pending:
                    self.changed.wait()
                waiting = list(self.pending)
            if all([self._write(run_id) for run_id in waiting]):
                delay = 0.05
            else:  # locked by another process: back off, keep the newest snapshots
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _pending(self, run_id: str) -> tuple | None:
        with self.changed:
            item = self.pending.get(run_id)
        return item[1] if item else None

    def _status(self, run_id: str, status: str) -> str:
        return "interrupted" if status in STOPPED and run_id not in self.ours else status

    def state(self, run_id: str) -> dict | None:
        check_run_id(run_id)
        if (pending := self._pending(run_id)) is not None:
            return pending[3]
        found = self._query("SELECT state, status FROM runs WHERE id = ?", (run_id,))
        if not found:
            return None
        state = _unpack(found[0][0])
        if "status" in state:
            state["status"] = self._status(run_id, state["status"])
        return state

    def csv(self, run_id: str) -> bytes | None:
        check_run_id(run_id)
        if (pending := self._pending(run_id)) is not None:
            csv = pending[4]
            return csv() if callable(csv) else csv
        found = self._query("SELECT csv FROM runs WHERE id = ?", (run_id,))
        return zlib.decompress(found[0][0]) if found and found[0][0] is not None else None

    def recent(self, limit: int, kind: str = "grid") -> list[dict]:
        """The newest ``limit`` runs of ``kind`` (``grid``, or a panel job's kind named in its
        summary), newest first."""
        rows = self._query(
            "SELECT id, created, status, summary FROM runs "
            "WHERE coalesce(json_extract(summary, '$.kind'), 'grid') = ? "
            "ORDER BY created DESC, id LIMIT ?",
            (kind, limit),
        )
        return [
            {"id": i, "created": c, "status": self._status(i, s), **json.loads(summary)} for i, c, s, summary in rows
        ]

    def __len__(self) -> int:
        return self._query("SELECT COUNT(*) FROM runs")[0][0]
