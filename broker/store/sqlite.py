"""The job store in SQLite: the embedded default for the demo and a one-box fleet.

`JobQueue` is the engine: every method one short transaction under a lock, so tests and
the CLI may read it from any thread. `SqliteStore` is the `JobStore` the fleet node uses:
the same calls on one thread of their own, off the event loop. One fleet node per file:
replicas need the PostgreSQL store. See broker/store/jobs.py for what the states mean.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

from agent.wire.codec import dump_model, parse_model
from agent.wire.errors import Reason
from broker.store.jobs import (
    DEFAULT_EXPIRY_S,
    WOKEN_COVER_S,
    WOKEN_FORGET_S,
    Completion,
    JobTemplate,
    Lease,
    QueueSummary,
)

T = TypeVar("T")

SCHEMA = """
PRAGMA journal_mode=WAL;
-- NORMAL: a power cut may lose the last transactions, never corrupt; a job leased twice
-- ends as one result because the collector deduplicates by job id.
PRAGMA synchronous=NORMAL;
CREATE TABLE IF NOT EXISTS jobs (
    job_id        TEXT PRIMARY KEY,
    template      BLOB NOT NULL,
    model_sha256  TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('queued', 'leased', 'done', 'failed')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    failures      INTEGER NOT NULL DEFAULT 0,
    expires_at    REAL,
    vehicle_id    TEXT,
    lease_expires REAL,
    leased_at     REAL,
    submitted_at  REAL NOT NULL,
    finished_at   REAL,
    last_reason   TEXT
);
CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (state, submitted_at);
CREATE TABLE IF NOT EXISTS assignments (
    job_id     TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    vehicle_id TEXT NOT NULL,
    digest     TEXT NOT NULL,
    sent_at    REAL NOT NULL,
    PRIMARY KEY (job_id, attempt)
);
CREATE TABLE IF NOT EXISTS results (
    job_id      TEXT PRIMARY KEY,
    attempt     INTEGER NOT NULL,
    vehicle_id  TEXT NOT NULL,
    body        BLOB NOT NULL,
    accepted_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS parked (
    vehicle_id   TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    since        REAL NOT NULL,
    woken_at     REAL,
    PRIMARY KEY (vehicle_id, model_sha256)
);
"""


def _locked(method: Callable[..., T]) -> Callable[..., T]:
    def call(self: JobQueue, *args: object, **kw: object) -> T:
        with self._lock:
            return method(self, *args, **kw)

    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


class JobQueue:
    """SQLite-backed queue; every method is one short transaction, under one lock."""

    def __init__(self, path: Path | str, *, lease_s: float = 30.0, max_attempts: int = 3) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column, kind in (
            ("failures", "INTEGER NOT NULL DEFAULT 0"),
            ("expires_at", "REAL"),
            ("leased_at", "REAL"),
        ):
            if column not in columns:  # a queue from before failures and expiry were kept
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self._lock = threading.RLock()

    @_locked
    def close(self) -> None:
        self._db.close()

    @_locked
    def submit(
        self,
        template: JobTemplate,
        *,
        now: float,
        job_id: str | None = None,
        expires_in_s: float = DEFAULT_EXPIRY_S,
    ) -> str:
        """Queue a job that may wait for a car up to `expires_in_s` from now."""
        if not expires_in_s > 0:
            raise ValueError(f"expires_in_s must be positive, got {expires_in_s}")
        job_id = job_id or uuid.uuid4().hex
        self._db.execute(
            "INSERT INTO jobs (job_id, template, model_sha256, state, submitted_at, expires_at) "
            "VALUES (?, ?, ?, 'queued', ?, ?)",
            (job_id, dump_model(template), template.model.sha256, now, now + expires_in_s),
        )
        return job_id

    @_locked
    def lease(
        self, vehicle_id: str, capacity: int, models: Collection[str], now: float
    ) -> list[Lease]:
        """Lease up to `capacity` queued jobs for models the vehicle holds, oldest first."""
        if not models or capacity <= 0:
            return []
        marks = ",".join("?" * len(models))
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._expire_queued(now)
            self._db.execute("DELETE FROM parked WHERE vehicle_id = ?", (vehicle_id,))
            rows = self._db.execute(
                f"SELECT job_id, attempts, template, expires_at FROM jobs WHERE state = 'queued' "  # noqa: S608 - only '?' marks
                f"AND model_sha256 IN ({marks}) ORDER BY submitted_at, rowid LIMIT ?",
                (*sorted(models), capacity),
            ).fetchall()
            leases = []
            for job_id, attempts, blob, expires_at in rows:
                self._db.execute(
                    "UPDATE jobs SET state = 'leased', attempts = ?, vehicle_id = ?, "
                    "lease_expires = ?, leased_at = ? WHERE job_id = ?",
                    (attempts + 1, vehicle_id, now + self.lease_s, now, job_id),
                )
                template = parse_model(
                    blob, JobTemplate, what="stored job", reason=Reason.MALFORMED_PAYLOAD
                )
                expiry = float("inf") if expires_at is None else float(expires_at)
                leases.append(Lease(job_id, attempts + 1, template, expiry))
            return leases

    def _expire_queued(self, now: float) -> int:
        """Fail queued jobs whose own expiry has passed (inside the caller's transaction)."""
        return self._db.execute(
            "UPDATE jobs SET state = 'failed', last_reason = 'expired', finished_at = ? "
            "WHERE state = 'queued' AND expires_at <= ?",
            (now, now),
        ).rowcount

    @_locked
    def record_assignment(
        self, job_id: str, attempt: int, vehicle_id: str, digest: str, now: float
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO assignments VALUES (?, ?, ?, ?, ?)",
            (job_id, attempt, vehicle_id, digest, now),
        )

    @_locked
    def assignment_digest(self, job_id: str, attempt: int, vehicle_id: str) -> str | None:
        row = self._db.execute(
            "SELECT digest FROM assignments WHERE job_id = ? AND attempt = ? AND vehicle_id = ?",
            (job_id, attempt, vehicle_id),
        ).fetchone()
        return None if row is None else str(row[0])

    def _end_lease(
        self, where: str, args: tuple[object, ...], reason: str, now: float, *, failure: bool
    ) -> int:
        """Requeue matching leased jobs; a `failure` counts against the job, and a job out of
        failures, or past its own expiry, fails for good. Returns how many leases ended."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            rows = self._db.execute(
                f"SELECT job_id, failures, expires_at FROM jobs WHERE state = 'leased' AND {where}",  # noqa: S608 - fixed clauses
                args,
            ).fetchall()
            for job_id, failures, expires_at in rows:
                failures += 1 if failure else 0
                expired = expires_at is not None and now >= expires_at
                done = failures >= self.max_attempts or expired
                final_reason = reason if not expired or failures >= self.max_attempts else "expired"
                self._db.execute(
                    "UPDATE jobs SET state = ?, failures = ?, vehicle_id = NULL, "
                    "lease_expires = NULL, last_reason = ?, finished_at = ? WHERE job_id = ?",
                    (
                        "failed" if done else "queued",
                        failures,
                        final_reason,
                        now if done else None,
                        job_id,
                    ),
                )
            return len(rows)

    @_locked
    def extend_lease(self, job_id: str, attempt: int, vehicle_id: str, now: float) -> bool:
        """The vehicle says it still holds this attempt: its lease runs from now again."""
        cur = self._db.execute(
            "UPDATE jobs SET lease_expires = ? WHERE job_id = ? AND attempts = ? "
            "AND vehicle_id = ? AND state = 'leased'",
            (now + self.lease_s, job_id, attempt, vehicle_id),
        )
        return cur.rowcount == 1

    @_locked
    def hand_back(
        self,
        job_id: str,
        attempt: int,
        vehicle_id: str,
        reason: str,
        now: float,
        *,
        failure: bool = True,
    ) -> int:
        """The vehicle released, was preempted on, rejected or failed this attempt; `failure`
        says whether that counts against the job (see counts_as_failure)."""
        return self._end_lease(
            "job_id = ? AND attempts = ? AND vehicle_id = ?",
            (job_id, attempt, vehicle_id),
            reason,
            now,
            failure=failure,
        )

    @_locked
    def vehicle_offline(self, vehicle_id: str, now: float) -> int:
        """The car went offline: its jobs go back to the queue, no failure counted."""
        return self._end_lease(
            "vehicle_id = ?", (vehicle_id,), "vehicle_offline", now, failure=False
        )

    @_locked
    def expire_leases(self, now: float) -> int:
        """Leases that ran out while the car said nothing count as a failure; jobs past their
        own expiry while queued fail."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._expire_queued(now)
        return self._end_lease("lease_expires < ?", (now,), "lease_expired", now, failure=True)

    @_locked
    def complete(
        self, job_id: str, attempt: int, vehicle_id: str, digest: str, body: bytes, now: float
    ) -> Completion:
        """Record a verified result: refused unless that attempt was sent to that vehicle with
        that digest; kept if it is the job's first (see JobStore.complete)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            sent = self._db.execute(
                "SELECT 1 FROM assignments WHERE job_id = ? AND attempt = ? AND vehicle_id = ? "
                "AND digest = ?",
                (job_id, attempt, vehicle_id, digest),
            ).fetchone()
            if sent is None:
                return Completion.NOT_SENT
            cur = self._db.execute(
                "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?)",
                (job_id, attempt, vehicle_id, body, now),
            )
            if cur.rowcount != 1:
                return Completion.DUPLICATE
            self._db.execute(
                "UPDATE jobs SET state = 'done', finished_at = ?, lease_expires = NULL, "
                "vehicle_id = ? WHERE job_id = ?",
                (now, vehicle_id, job_id),
            )
            return Completion.FIRST

    @_locked
    def result_of(self, job_id: str) -> bytes | None:
        row = self._db.execute("SELECT body FROM results WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else bytes(row[0])

    @_locked
    def park(self, vehicle_id: str, models: Collection[str], now: float) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM parked WHERE vehicle_id = ?", (vehicle_id,))
            self._db.executemany(
                "INSERT INTO parked VALUES (?, ?, ?, NULL)",
                [(vehicle_id, m, now) for m in set(models)],
            )

    @_locked
    def wake(self, limit: int, now: float) -> list[str]:
        # Called every half second by each node: nobody parked, no write transaction.
        waiting = self._db.execute("SELECT 1 FROM parked WHERE woken_at IS NULL LIMIT 1")
        if waiting.fetchone() is None:
            return []
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            wanted = dict(
                self._db.execute(
                    "SELECT model_sha256, COUNT(*) FROM jobs WHERE state = 'queued' "
                    "AND (expires_at IS NULL OR expires_at > ?) GROUP BY model_sha256",
                    (now,),
                ).fetchall()
            )
            self._db.execute("DELETE FROM parked WHERE woken_at < ?", (now - WOKEN_FORGET_S,))
            woken: list[str] = []
            for model, queued in wanted.items():
                (covered,) = self._db.execute(
                    "SELECT COUNT(*) FROM parked WHERE model_sha256 = ? AND woken_at > ?",
                    (model, now - WOKEN_COVER_S),
                ).fetchone()
                n = min(queued - covered, limit - len(woken))
                if n <= 0:
                    continue
                rows = self._db.execute(
                    "SELECT vehicle_id FROM parked WHERE model_sha256 = ? AND woken_at IS NULL "
                    "ORDER BY since LIMIT ?",
                    (model, n),
                ).fetchall()
                for (vehicle_id,) in rows:
                    self._db.execute(
                        "UPDATE parked SET woken_at = ? WHERE vehicle_id = ?", (now, vehicle_id)
                    )
                    woken.append(vehicle_id)
            return woken

    @_locked
    def summary(self) -> QueueSummary:
        oldest = self._db.execute("SELECT MIN(leased_at) FROM jobs WHERE state = 'leased'")
        (oldest_at,) = oldest.fetchone()
        (parked,) = self._db.execute(
            "SELECT COUNT(DISTINCT vehicle_id) FROM parked WHERE woken_at IS NULL"
        ).fetchone()
        return QueueSummary(
            counts=self.counts(),
            oldest_lease_at=oldest_at,
            parked_vehicles=int(parked),
        )

    @_locked
    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return dict(rows)

    @_locked
    def assignments_by_vehicle(self) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT vehicle_id, COUNT(*) FROM assignments GROUP BY vehicle_id"
        ).fetchall()
        return dict(rows)

    @_locked
    def state_of(self, job_id: str) -> tuple[str, int, str | None]:
        row = self._db.execute(
            "SELECT state, attempts, last_reason FROM jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
        if row is None:
            raise KeyError(job_id)
        return str(row[0]), int(row[1]), row[2]

    @_locked
    def failures_of(self, job_id: str) -> int:
        """How many of the job's leases ended with the job failing."""
        row = self._db.execute("SELECT failures FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return int(row[0])


class SqliteStore:
    """The `JobStore` on a `JobQueue`: each call on the store's own thread."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")

    @classmethod
    def open(cls, path: Path, *, lease_s: float = 30.0, max_attempts: int = 3) -> SqliteStore:
        from broker.store import StoreError

        try:
            return cls(JobQueue(path, lease_s=lease_s, max_attempts=max_attempts))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the queue {path}: {exc}") from None

    @property
    def lease_s(self) -> float:
        return self.queue.lease_s

    @lease_s.setter
    def lease_s(self, value: float) -> None:
        self.queue.lease_s = value

    @property
    def max_attempts(self) -> int:
        return self.queue.max_attempts

    async def _call(self, fn: Callable[..., T], *args: object, **kw: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, partial(fn, *args, **kw))

    async def submit(
        self,
        template: JobTemplate,
        *,
        now: float,
        job_id: str | None = None,
        expires_in_s: float = DEFAULT_EXPIRY_S,
    ) -> str:
        return await self._call(
            self.queue.submit, template, now=now, job_id=job_id, expires_in_s=expires_in_s
        )

    async def lease(
        self, vehicle_id: str, capacity: int, models: Collection[str], now: float
    ) -> list[Lease]:
        return await self._call(self.queue.lease, vehicle_id, capacity, models, now)

    async def record_assignment(
        self, job_id: str, attempt: int, vehicle_id: str, digest: str, now: float
    ) -> None:
        await self._call(self.queue.record_assignment, job_id, attempt, vehicle_id, digest, now)

    async def extend_lease(self, job_id: str, attempt: int, vehicle_id: str, now: float) -> bool:
        return await self._call(self.queue.extend_lease, job_id, attempt, vehicle_id, now)

    async def hand_back(
        self,
        job_id: str,
        attempt: int,
        vehicle_id: str,
        reason: str,
        now: float,
        *,
        failure: bool = True,
    ) -> int:
        return await self._call(
            self.queue.hand_back, job_id, attempt, vehicle_id, reason, now, failure=failure
        )

    async def vehicle_offline(self, vehicle_id: str, now: float) -> int:
        return await self._call(self.queue.vehicle_offline, vehicle_id, now)

    async def expire_leases(self, now: float) -> int:
        return await self._call(self.queue.expire_leases, now)

    async def complete(
        self, job_id: str, attempt: int, vehicle_id: str, digest: str, body: bytes, now: float
    ) -> Completion:
        return await self._call(self.queue.complete, job_id, attempt, vehicle_id, digest, body, now)

    async def park(self, vehicle_id: str, models: Collection[str], now: float) -> None:
        await self._call(self.queue.park, vehicle_id, models, now)

    async def wake(self, limit: int, now: float) -> list[str]:
        return await self._call(self.queue.wake, limit, now)

    async def counts(self) -> dict[str, int]:
        return await self._call(self.queue.counts)

    async def summary(self) -> QueueSummary:
        return await self._call(self.queue.summary)

    async def state_of(self, job_id: str) -> tuple[str, int, str | None]:
        return await self._call(self.queue.state_of, job_id)

    async def failures_of(self, job_id: str) -> int:
        return await self._call(self.queue.failures_of, job_id)

    async def result_of(self, job_id: str) -> bytes | None:
        return await self._call(self.queue.result_of, job_id)

    async def close(self) -> None:
        await self._call(self.queue.close)
        self._thread.shutdown(wait=False)
