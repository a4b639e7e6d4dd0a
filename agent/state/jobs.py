"""Durable job state on the vehicle: the replay record, the job journal and the result outbox.

One SQLite file (WAL) in the state directory, beside the energy ledger:
  seen     every (job_id, attempt) accepted or refused after verification, until it
           expires: a redelivered or replayed job never runs twice, across restarts;
  journal  jobs accepted and not yet finished: after a crash, the next start hands
           them back (released, reason agent_restarted) instead of forgetting them;
  meta     the trusted clock floor: the latest issue time of any verified job, so a
           clock set backwards cannot revive expired jobs;
  policy   the trust policy held (its signed envelope), once one has arrived over the
           wire: a restart never falls back to the older installed file;
  outbox   sealed results, written before they are published and removed only once
           the broker has acknowledged them (QoS 1 PUBACK), sent in order on every
           (re)connection. A job's result enters the outbox in the same transaction
           that closes its journal entry. Results over OUTBOX_INLINE_MAX bytes are kept
           as files in `outbox/` beside the database (the row names the file and its
           size): SQLite would write a 1 MB blob twice (WAL, then checkpoint) and churn
           its pages again on delete, about 6 ms of CPU per result against 0.5 ms.
           The latest results written are also kept in memory (up to OUTBOX_MEMORY_BYTES)
           until acknowledged, so the usual case, a result sent the moment it is sealed,
           never reads its file back; the files are for a restart or a long outage.
Blocking calls; the daemon runs them in a thread.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import uuid
from pathlib import Path

from agent.state.ledger import open_state_db

_SCHEMA = """
PRAGMA journal_mode=WAL;
PRAGMA synchronous=NORMAL;
CREATE TABLE IF NOT EXISTS seen (
    job_id TEXT NOT NULL, attempt INTEGER NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (job_id, attempt)
);
CREATE TABLE IF NOT EXISTS journal (
    job_id TEXT NOT NULL, attempt INTEGER NOT NULL, state TEXT NOT NULL, since REAL NOT NULL,
    PRIMARY KEY (job_id, attempt)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS policy (
    id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL, raw BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
    job_id TEXT NOT NULL, attempt INTEGER NOT NULL, created_at REAL NOT NULL,
    file TEXT, size INTEGER
);
"""
OUTBOX_INLINE_MAX = 64 * 1024
OUTBOX_MEMORY_BYTES = 8 * 1024 * 1024  # of results kept in memory as well as on disk


class JobStore:
    def __init__(self, path: Path, memory_bytes: int = OUTBOX_MEMORY_BYTES) -> None:
        self._db = open_state_db(path, _SCHEMA)
        self._lock = threading.Lock()
        self._files = path.parent / "outbox"
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
        for column, kind in (("file", "TEXT"), ("size", "INTEGER")):
            if column not in columns:  # a database from before results were kept as files
                self._db.execute(f"ALTER TABLE outbox ADD COLUMN {column} {kind}")
        self.damaged = 0  # outbox entries whose file was missing or cut short (power loss)
        self._unsent: dict[int, bytes] = {}  # seq -> payload of the latest results written
        self._memory_bytes = memory_bytes
        self._remove_orphan_files()

    def _remove_orphan_files(self) -> None:
        """Files no row names: a crash between deleting a row and its file, or mid-write."""
        if not self._files.is_dir():
            return
        with self._lock:
            named = {
                r[0] for r in self._db.execute("SELECT file FROM outbox WHERE file IS NOT NULL")
            }
        for path in self._files.iterdir():
            if path.name not in named:
                with contextlib.suppress(OSError):
                    path.unlink()

    # ---- replay record -----------------------------------------------------

    def load_seen(self, now: float) -> dict[tuple[str, int], float]:
        """Every unexpired (job_id, attempt) seen, with its expiry; expired ones are dropped."""
        with self._lock:
            # Pruning is a write; on a full disk the agent still starts (its gate stays shut).
            with contextlib.suppress(sqlite3.OperationalError):
                self._db.execute("DELETE FROM seen WHERE expires_at < ?", (now,))
            rows = self._db.execute("SELECT job_id, attempt, expires_at FROM seen").fetchall()
        return {(str(j), int(a)): float(e) for j, a, e in rows}

    def remember(
        self,
        job_id: str,
        attempt: int,
        expires_at: float,
        *,
        accepted: bool,
        now: float,
        clock_floor: float | None = None,
    ) -> None:
        """Record a verified job as seen, journal it if it was accepted, and raise the clock
        floor to `clock_floor` if given: one transaction."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT OR IGNORE INTO seen VALUES (?, ?, ?)", (job_id, attempt, expires_at)
            )
            if accepted:
                self._db.execute(
                    "INSERT OR REPLACE INTO journal VALUES (?, ?, 'accepted', ?)",
                    (job_id, attempt, now),
                )
            if clock_floor is not None:
                self._db.execute(
                    "INSERT INTO meta VALUES ('clock_floor', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
                    (clock_floor,),
                )

    def clock_floor(self) -> float:
        """The latest issue time seen on a verified job: the agent never believes an earlier now."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'clock_floor'").fetchone()
        return 0.0 if row is None else float(row[0])

    # ---- trust policy ------------------------------------------------------

    def held_policy(self) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT raw FROM policy WHERE id = 1").fetchone()
        return None if row is None else bytes(row[0])

    def save_policy(self, version: int, raw: bytes) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO policy VALUES (1, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET version = excluded.version, raw = excluded.raw",
                (version, raw),
            )

    def prune_seen(self, now: float) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM seen WHERE expires_at < ?", (now,)).rowcount

    # ---- journal -----------------------------------------------------------

    def mark(self, job_id: str, attempt: int, state: str, now: float) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE journal SET state = ?, since = ? WHERE job_id = ? AND attempt = ?",
                (state, now, job_id, attempt),
            )

    def finish(self, job_id: str, attempt: int) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM journal WHERE job_id = ? AND attempt = ?", (job_id, attempt)
            )

    def interrupted(self) -> list[tuple[str, int, str]]:
        """Jobs a previous run accepted and never finished (it crashed or lost power)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, attempt, state FROM journal ORDER BY since"
            ).fetchall()
        return [(str(j), int(a), str(s)) for j, a, s in rows]

    # ---- outbox ------------------------------------------------------------

    def finish_with_result(
        self, job_id: str, attempt: int, topic: str, payload: bytes, now: float
    ) -> int:
        """Put a sealed result in the outbox and close the job's journal entry, atomically."""
        file = None
        if len(payload) > OUTBOX_INLINE_MAX:
            self._files.mkdir(mode=0o700, exist_ok=True)
            file = f"{uuid.uuid4().hex}.bin"
            tmp = self._files / f"{file}.tmp"
            try:
                with tmp.open("wb") as f:
                    f.write(payload)
                os.replace(tmp, self._files / file)
            except OSError:  # a full disk: nothing half-written stays behind
                tmp.unlink(missing_ok=True)
                raise
        try:
            with self._lock, self._db:
                self._db.execute("BEGIN")
                cur = self._db.execute(
                    "INSERT INTO outbox (topic, payload, job_id, attempt, created_at, file, size) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (topic, b"" if file else payload, job_id, attempt, now, file, len(payload)),
                )
                self._db.execute(
                    "DELETE FROM journal WHERE job_id = ? AND attempt = ?", (job_id, attempt)
                )
                seq = int(cur.lastrowid or 0)
        except sqlite3.Error:
            if file is not None:
                (self._files / file).unlink(missing_ok=True)
            raise
        if file is not None:
            with self._lock:
                held = sum(len(p) for p in self._unsent.values())
                if held + len(payload) <= self._memory_bytes:
                    self._unsent[seq] = payload
        return seq

    def outbox_batch(self, limit: int = 16) -> list[tuple[int, str, bytes, str, int]]:
        """The oldest results waiting: (seq, topic, payload, job_id, attempt). An entry whose
        file is gone or cut short is dropped and counted in `damaged`."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload, job_id, attempt, file, size FROM outbox "
                "ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
            unsent = {row[0]: self._unsent[row[0]] for row in rows if row[0] in self._unsent}
        batch = []
        for seq, topic, payload, job_id, attempt, file, size in rows:
            if seq in unsent:
                payload = unsent[seq]
            elif file is not None:
                try:
                    payload = (self._files / file).read_bytes()
                except OSError:
                    payload = b""
                if len(payload) != size:
                    self.damaged += 1
                    self.outbox_remove(int(seq))
                    continue
            batch.append((int(seq), str(topic), bytes(payload), str(job_id), int(attempt)))
        return batch

    def outbox_remove(self, seq: int) -> None:
        with self._lock:
            self._unsent.pop(seq, None)
            row = self._db.execute("SELECT file FROM outbox WHERE seq = ?", (seq,)).fetchone()
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
        if row is not None and row[0] is not None:
            with contextlib.suppress(FileNotFoundError):
                (self._files / row[0]).unlink()

    def outbox_size(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(n)

    def probe(self, now: float, room_bytes: int = 256 * 1024) -> None:
        """Raise what a full or failing disk raises (OSError, sqlite3.Error) unless the state
        directory takes writes again: a transaction in the database, a checkpoint of its log,
        and `room_bytes` written, synced and removed beside it."""
        with self._lock:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "INSERT INTO meta VALUES ('probe', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (now,),
                )
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        room = self._files.parent / f".probe-{uuid.uuid4().hex}"
        try:
            with room.open("wb") as f:
                f.write(bytes(room_bytes))
                f.flush()
                os.fsync(f.fileno())
        finally:
            with contextlib.suppress(OSError):
                room.unlink()

    def close(self) -> None:
        with self._lock:
            self._db.close()
