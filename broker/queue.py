"""The dispatcher's job queue in SQLite: jobs, their assignments to vehicles, and leases.

A job is queued until a vehicle asks for work; it is then leased to that
vehicle for `lease_s`. A lease ends when the result arrives (done), when the
vehicle hands the job back, is preempted or goes offline, or when the lease
expires: then the job is queued again. Mosquitto does not redeliver an
in-flight message to another subscriber, so this bookkeeping cannot be left to
the broker.

Two bounds end a job that will not finish, and they count different things:
  - failures: a lease that ended through the job or the car failing it (a failed or
    rejected attempt, a lease that ran out while the car stayed online). The job fails
    for good after `max_attempts` of them.
  - its expiry (`expires_at`, set at submit): the car coming first (a preemption, a
    hand-back by a closed gate or a busy or restarting agent, a car gone offline, a worker
    killed from outside) is normal, never a failure; such a job is queued again, as
    often as it takes, until it expires.
`attempts` numbers the leases (each signed job carries it; the vehicle's replay record
keys on it), so it rises with every lease whatever the outcome.
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
    failures      INTEGER NOT NULL DEFAULT 0,
    expires_at    REAL,
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


# Hand-backs that put the car first: never counted as a failure of the job.
CAR_FIRST_REASONS = frozenset(
    {
        "gate_closed",
        "busy",
        "shutdown",
        "agent_restarted",
        "vehicle_offline",
        "worker_killed",
        "worker_unavailable",
        "state_disk_unavailable",
    }
)
DEFAULT_EXPIRY_S = 24 * 3600.0  # how long a submitted job may wait for a car, by default


def counts_as_failure(kind: str, reason: str) -> bool:
    """Whether a lease ending with this event kind and reason is the job failing: preempted and
    released attempts, and the car-first reasons, are not."""
    if kind in ("preempted", "released"):
        return False
    return reason not in CAR_FIRST_REASONS


@dataclass(frozen=True, slots=True)
class Lease:
    job_id: str
    attempt: int
    template: JobTemplate
    expires_at: float  # the job's own expiry: no signed attempt may outlive it


class JobQueue:
    """SQLite-backed queue; every method is one short transaction."""

    def __init__(self, path: Path | str, *, lease_s: float = 30.0, max_attempts: int = 3) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column, kind in (("failures", "INTEGER NOT NULL DEFAULT 0"), ("expires_at", "REAL")):
            if column not in columns:  # a queue from before failures and expiry were kept
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        self.lease_s = lease_s
        self.max_attempts = max_attempts

    def close(self) -> None:
        self._db.close()

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

    def lease(self, vehicle_id: str, capacity: int, models: set[str], now: float) -> list[Lease]:
        """Lease up to `capacity` queued jobs for models the vehicle holds, oldest first."""
        if not models or capacity <= 0:
            return []
        marks = ",".join("?" * len(models))
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._expire_queued(now)
            rows = self._db.execute(
                f"SELECT job_id, attempts, template, expires_at FROM jobs WHERE state = 'queued' "  # noqa: S608 - only '?' marks
                f"AND model_sha256 IN ({marks}) ORDER BY submitted_at, rowid LIMIT ?",
                (*sorted(models), capacity),
            ).fetchall()
            leases = []
            for job_id, attempts, blob, expires_at in rows:
                self._db.execute(
                    "UPDATE jobs SET state = 'leased', attempts = ?, vehicle_id = ?, "
                    "lease_expires = ? WHERE job_id = ?",
                    (attempts + 1, vehicle_id, now + self.lease_s, job_id),
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

    def extend_lease(self, job_id: str, attempt: int, vehicle_id: str, now: float) -> bool:
        """The vehicle says it still holds this attempt: its lease runs from now again."""
        cur = self._db.execute(
            "UPDATE jobs SET lease_expires = ? WHERE job_id = ? AND attempts = ? "
            "AND vehicle_id = ? AND state = 'leased'",
            (now + self.lease_s, job_id, attempt, vehicle_id),
        )
        return cur.rowcount == 1

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

    def vehicle_offline(self, vehicle_id: str, now: float) -> int:
        """The car went offline: its jobs go back to the queue, no failure counted."""
        return self._end_lease(
            "vehicle_id = ?", (vehicle_id,), "vehicle_offline", now, failure=False
        )

    def expire_leases(self, now: float) -> int:
        """Leases that ran out while the car said nothing count as a failure; jobs past their
        own expiry while queued fail."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._expire_queued(now)
        return self._end_lease("lease_expires < ?", (now,), "lease_expired", now, failure=True)

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

    def failures_of(self, job_id: str) -> int:
        """How many of the job's leases ended with the job failing."""
        row = self._db.execute("SELECT failures FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return int(row[0])
