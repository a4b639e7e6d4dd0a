"""The dispatcher's job queue in SQLite: jobs, their assignments to vehicles, and leases.

A job is queued until a vehicle asks for work; it is then leased to that
vehicle for `lease_s`. A lease ends when the result arrives (done), when the
vehicle hands the job back, is preempted or goes offline, or when the lease
expires: then the job is queued again, up to `max_attempts`, and failed after.
Mosquitto does not redeliver an in-flight message to another subscriber, so
this bookkeeping cannot be left to the broker.
"""

from __future__ import annotations

import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, model_validator

from agent.wire.codec import B64Bytes, WireModel, dump_model, parse_model
from agent.wire.errors import Reason
from agent.wire.keys import x25519_agreeable
from agent.wire.messages import NAME_RE, Limits, ModelRef
from agent.wire.tensors import Tensor

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
    vehicle_id    TEXT,
    lease_expires REAL,
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
"""


class JobTemplate(WireModel):
    """A job as submitted, before it is bound to a vehicle and signed."""

    job_class: str = Field(pattern=NAME_RE)
    model: ModelRef
    inputs: dict[str, Tensor]
    limits: Limits
    requester_key: B64Bytes = Field(min_length=32, max_length=32)
    lifetime_s: float = Field(gt=0, le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _sealable(self) -> JobTemplate:
        if not x25519_agreeable(self.requester_key):
            raise ValueError("requester_key is a low-order X25519 point: no result can be sealed")
        return self


@dataclass(frozen=True, slots=True)
class Lease:
    job_id: str
    attempt: int
    template: JobTemplate


class JobQueue:
    """SQLite-backed queue; every method is one short transaction."""

    def __init__(self, path: Path | str, *, lease_s: float = 30.0, max_attempts: int = 3) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.executescript(SCHEMA)
        self.lease_s = lease_s
        self.max_attempts = max_attempts

    def close(self) -> None:
        self._db.close()

    def submit(self, template: JobTemplate, *, now: float, job_id: str | None = None) -> str:
        job_id = job_id or uuid.uuid4().hex
        self._db.execute(
            "INSERT INTO jobs (job_id, template, model_sha256, state, submitted_at) "
            "VALUES (?, ?, ?, 'queued', ?)",
            (job_id, dump_model(template), template.model.sha256, now),
        )
        return job_id

    def lease(self, vehicle_id: str, capacity: int, models: set[str], now: float) -> list[Lease]:
        """Lease up to `capacity` queued jobs for models the vehicle holds, oldest first."""
        if not models or capacity <= 0:
            return []
        marks = ",".join("?" * len(models))
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            rows = self._db.execute(
                f"SELECT job_id, attempts, template FROM jobs WHERE state = 'queued' "  # noqa: S608 - only '?' marks
                f"AND model_sha256 IN ({marks}) ORDER BY submitted_at, rowid LIMIT ?",
                (*sorted(models), capacity),
            ).fetchall()
            leases = []
            for job_id, attempts, blob in rows:
                self._db.execute(
                    "UPDATE jobs SET state = 'leased', attempts = ?, vehicle_id = ?, "
                    "lease_expires = ? WHERE job_id = ?",
                    (attempts + 1, vehicle_id, now + self.lease_s, job_id),
                )
                template = parse_model(
                    blob, JobTemplate, what="stored job", reason=Reason.MALFORMED_PAYLOAD
                )
                leases.append(Lease(job_id, attempts + 1, template))
            return leases

    def record_assignment(
        self, job_id: str, attempt: int, vehicle_id: str, digest: str, now: float
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO assignments VALUES (?, ?, ?, ?, ?)",
            (job_id, attempt, vehicle_id, digest, now),
        )

    def assignment_digest(self, job_id: str, attempt: int, vehicle_id: str) -> str | None:
        row = self._db.execute(
            "SELECT digest FROM assignments WHERE job_id = ? AND attempt = ? AND vehicle_id = ?",
            (job_id, attempt, vehicle_id),
        ).fetchone()
        return None if row is None else str(row[0])

    def _end_lease(self, where: str, args: tuple[object, ...], reason: str, now: float) -> int:
        """Requeue matching leased jobs, or fail those out of attempts. Returns how many."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            rows = self._db.execute(
                f"SELECT job_id, attempts FROM jobs WHERE state = 'leased' AND {where}",  # noqa: S608 - fixed clauses
                args,
            ).fetchall()
            for job_id, attempts in rows:
                out_of_attempts = attempts >= self.max_attempts
                self._db.execute(
                    "UPDATE jobs SET state = ?, vehicle_id = NULL, lease_expires = NULL, "
                    "last_reason = ?, finished_at = ? WHERE job_id = ?",
                    (
                        "failed" if out_of_attempts else "queued",
                        reason,
                        now if out_of_attempts else None,
                        job_id,
                    ),
                )
            return len(rows)

    def extend_lease(self, job_id: str, attempt: int, vehicle_id: str, now: float) -> bool:
        """The vehicle says it still holds this attempt: its lease runs from now again."""
        cur = self._db.execute(
            "UPDATE jobs SET lease_expires = ? WHERE job_id = ? AND attempts = ? "
            "AND vehicle_id = ? AND state = 'leased'",
            (now + self.lease_s, job_id, attempt, vehicle_id),
        )
        return cur.rowcount == 1

    def hand_back(self, job_id: str, attempt: int, vehicle_id: str, reason: str, now: float) -> int:
        """The vehicle released, was preempted on, rejected or failed this attempt."""
        return self._end_lease(
            "job_id = ? AND attempts = ? AND vehicle_id = ?",
            (job_id, attempt, vehicle_id),
            reason,
            now,
        )

    def vehicle_offline(self, vehicle_id: str, now: float) -> int:
        return self._end_lease("vehicle_id = ?", (vehicle_id,), "vehicle_offline", now)

    def expire_leases(self, now: float) -> int:
        return self._end_lease("lease_expires < ?", (now,), "lease_expired", now)

    def complete(self, job_id: str, now: float) -> bool:
        """Mark a job done when its first verified result arrives; False if it already was."""
        cur = self._db.execute(
            "UPDATE jobs SET state = 'done', finished_at = ?, lease_expires = NULL "
            "WHERE job_id = ? AND state != 'done'",
            (now, job_id),
        )
        return cur.rowcount == 1

    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return dict(rows)

    def assignments_by_vehicle(self) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT vehicle_id, COUNT(*) FROM assignments GROUP BY vehicle_id"
        ).fetchall()
        return dict(rows)

    def state_of(self, job_id: str) -> tuple[str, int, str | None]:
        row = self._db.execute(
            "SELECT state, attempts, last_reason FROM jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
        if row is None:
            raise KeyError(job_id)
        return str(row[0]), int(row[1]), row[2]
