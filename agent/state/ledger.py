"""The energy ledger: Wh lent per owner's day and per job, in SQLite (WAL), restart-safe.

Blocking calls; the daemon runs them in a thread. Totals are written at every
job end and every few seconds while computing, so a crash loses at most that
interval of accounting.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

_SCHEMA = """
PRAGMA journal_mode=WAL;
PRAGMA synchronous=NORMAL;
CREATE TABLE IF NOT EXISTS energy_days (day TEXT PRIMARY KEY, wh REAL NOT NULL);
CREATE TABLE IF NOT EXISTS energy_jobs (
    job_id TEXT NOT NULL, attempt INTEGER NOT NULL, day TEXT NOT NULL, wh REAL NOT NULL,
    finished_at REAL NOT NULL, outcome TEXT NOT NULL, PRIMARY KEY (job_id, attempt)
);
"""


# The write-ahead log is checkpointed every 256 pages (1 MiB) and cut back to 1 MiB after
# each checkpoint: on a small state partition an unbounded WAL fills the disk by itself.
_BOUNDED_WAL = """
PRAGMA wal_autocheckpoint=256;
PRAGMA journal_size_limit=1048576;
"""


def is_storage_error(exc: BaseException) -> bool:
    """True for what a full or failing state disk raises (ENOSPC, EIO, SQLITE_FULL, ...)."""
    return isinstance(exc, (OSError, sqlite3.Error))


class StateError(Exception):
    """Raised when the state directory or database cannot be used; says which path and why."""


def open_state_db(path: Path, schema: str) -> sqlite3.Connection:
    """A connection to the state database with `schema` applied; StateError saying what to check."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        db.executescript(schema)
        db.executescript(_BOUNDED_WAL)
    except (OSError, sqlite3.Error) as exc:
        raise StateError(
            f"cannot open the state database {path}: {exc}; check that the state "
            "directory exists, is writable by the agent, and the disk is not full"
        ) from None
    return db


class EnergyLedger:
    def __init__(self, path: Path) -> None:
        self._db = open_state_db(path, _SCHEMA)
        self._lock = threading.Lock()

    def day_total(self, day: str) -> float:
        with self._lock:
            row = self._db.execute("SELECT wh FROM energy_days WHERE day = ?", (day,)).fetchone()
        return 0.0 if row is None else float(row[0])

    def save_day(self, day: str, wh: float) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO energy_days VALUES (?, ?) ON CONFLICT(day) DO UPDATE SET wh = excluded.wh",
                (day, wh),
            )

    def record_job(
        self,
        job_id: str,
        attempt: int,
        day: str,
        wh: float,
        finished_at: float,
        outcome: str,
        day_total: float,
    ) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT OR REPLACE INTO energy_jobs VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, attempt, day, wh, finished_at, outcome),
            )
            self._db.execute(
                "INSERT INTO energy_days VALUES (?, ?) ON CONFLICT(day) DO UPDATE SET wh = excluded.wh",
                (day, day_total),
            )

    def job_wh(self, job_id: str, attempt: int) -> float | None:
        with self._lock:
            row = self._db.execute(
                "SELECT wh FROM energy_jobs WHERE job_id = ? AND attempt = ?", (job_id, attempt)
            ).fetchone()
        return None if row is None else float(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
