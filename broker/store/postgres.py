"""The job store in PostgreSQL, for fleet nodes that run as several replicas.

Leasing is `SELECT ... FOR UPDATE SKIP LOCKED`: replicas asking at once each get other
jobs, none waits on another's rows. Every call is one short transaction (a long one holds
the xmin horizon and slows every SKIP LOCKED scan: see FIELD_NOTES.md). One async
connection per store, its calls taken in turn; the fleet node handles its messages in
order, so a second connection would mostly wait. See broker/store/jobs.py for the states.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Collection
from typing import Any

import psycopg

from agent.wire.codec import dump_model, parse_model
from agent.wire.errors import Reason
from broker.store import StoreError
from broker.store.jobs import (
    DEFAULT_EXPIRY_S,
    WOKEN_COVER_S,
    WOKEN_FORGET_S,
    Completion,
    JobTemplate,
    Lease,
    QueueSummary,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id        TEXT PRIMARY KEY,
    seq           BIGSERIAL,
    template      BYTEA NOT NULL,
    model_sha256  TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('queued', 'leased', 'done', 'failed')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    failures      INTEGER NOT NULL DEFAULT 0,
    expires_at    DOUBLE PRECISION NOT NULL,
    vehicle_id    TEXT,
    lease_expires DOUBLE PRECISION,
    leased_at     DOUBLE PRECISION,
    submitted_at  DOUBLE PRECISION NOT NULL,
    finished_at   DOUBLE PRECISION,
    last_reason   TEXT
);
CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (model_sha256, submitted_at, seq)
    WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_leased_until ON jobs (lease_expires) WHERE state = 'leased';
CREATE INDEX IF NOT EXISTS jobs_leased_by ON jobs (vehicle_id) WHERE state = 'leased';
CREATE TABLE IF NOT EXISTS assignments (
    job_id     TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    vehicle_id TEXT NOT NULL,
    digest     TEXT NOT NULL,
    sent_at    DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (job_id, attempt)
);
CREATE TABLE IF NOT EXISTS results (
    job_id      TEXT PRIMARY KEY,
    attempt     INTEGER NOT NULL,
    vehicle_id  TEXT NOT NULL,
    body        BYTEA NOT NULL,
    accepted_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS parked (
    vehicle_id   TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    since        DOUBLE PRECISION NOT NULL,
    woken_at     DOUBLE PRECISION,
    PRIMARY KEY (vehicle_id, model_sha256)
);
CREATE INDEX IF NOT EXISTS parked_by_model ON parked (model_sha256, since);
"""

# Oldest first per model through the queued index (an `= ANY(models)` would sort every
# queued row of those models on each lease: 4 ms a lease at 10,000 queued, measured), then
# the oldest of those. Up to n rows per model are locked for the moment of the statement.
_LEASE = """
WITH unparked AS (DELETE FROM parked WHERE vehicle_id = %(vehicle)s),
picked AS (
    SELECT c.job_id FROM unnest(%(models)s::text[]) AS m(sha)
    CROSS JOIN LATERAL (
        SELECT job_id, submitted_at, seq FROM jobs
        WHERE state = 'queued' AND model_sha256 = m.sha AND expires_at > %(now)s
        ORDER BY submitted_at, seq LIMIT %(n)s
        FOR UPDATE SKIP LOCKED
    ) AS c
    ORDER BY c.submitted_at, c.seq LIMIT %(n)s
)
UPDATE jobs AS j SET state = 'leased', attempts = j.attempts + 1, vehicle_id = %(vehicle)s,
    lease_expires = %(until)s, leased_at = %(now)s
FROM picked WHERE j.job_id = picked.job_id
RETURNING j.job_id, j.attempts, j.template, j.expires_at, j.submitted_at, j.seq
"""

# One statement ends the matching leases; every right-hand side reads the row as it was.
_END_LEASE = """
UPDATE jobs SET
    failures = failures + %(f)s,
    state = CASE WHEN failures + %(f)s >= %(max)s OR %(now)s >= expires_at
                 THEN 'failed' ELSE 'queued' END,
    last_reason = CASE WHEN %(now)s >= expires_at AND failures + %(f)s < %(max)s
                       THEN 'expired' ELSE %(reason)s END,
    finished_at = CASE WHEN failures + %(f)s >= %(max)s OR %(now)s >= expires_at
                       THEN %(now)s ELSE NULL END,
    vehicle_id = NULL,
    lease_expires = NULL
WHERE state = 'leased' AND {where}
"""

_EXPIRE_QUEUED = """
UPDATE jobs SET state = 'failed', last_reason = 'expired', finished_at = %(now)s
WHERE state = 'queued' AND expires_at <= %(now)s
"""


class PostgresStore:
    def __init__(
        self, conn: psycopg.AsyncConnection[Any], *, lease_s: float, max_attempts: int
    ) -> None:
        self._conn = conn
        self._turn = asyncio.Lock()
        self.lease_s = lease_s
        self.max_attempts = max_attempts

    @classmethod
    async def connect(
        cls, dsn: str, *, lease_s: float = 30.0, max_attempts: int = 3
    ) -> PostgresStore:
        try:
            conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            where = dsn.split("@")[-1]  # never print a password from the URL
            raise StoreError(f"cannot connect to the PostgreSQL store at {where}: {exc}") from None
        async with conn.transaction():
            # Replicas starting together: one creates the tables, the others wait for it.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('edge-fleet-schema'))")
            await conn.execute(SCHEMA)
        return cls(conn, lease_s=lease_s, max_attempts=max_attempts)

    async def _rows(self, sql: str, params: dict[str, Any] | tuple[Any, ...] = ()) -> list[Any]:
        async with self._turn:
            cur = await self._conn.execute(sql, params)
            return await cur.fetchall() if cur.description else []

    async def submit(
        self,
        template: JobTemplate,
        *,
        now: float,
        job_id: str | None = None,
        expires_in_s: float = DEFAULT_EXPIRY_S,
    ) -> str:
        if not expires_in_s > 0:
            raise ValueError(f"expires_in_s must be positive, got {expires_in_s}")
        job_id = job_id or uuid.uuid4().hex
        await self._rows(
            "INSERT INTO jobs (job_id, template, model_sha256, state, submitted_at, expires_at) "
            "VALUES (%s, %s, %s, 'queued', %s, %s)",
            (job_id, dump_model(template), template.model.sha256, now, now + expires_in_s),
        )
        return job_id

    async def lease(
        self, vehicle_id: str, capacity: int, models: Collection[str], now: float
    ) -> list[Lease]:
        if not models or capacity <= 0:
            return []
        params = {
            "models": sorted(models),
            "now": now,
            "n": capacity,
            "vehicle": vehicle_id,
            "until": now + self.lease_s,
        }
        rows = await self._rows(_LEASE, params)
        rows.sort(key=lambda r: (r[4], r[5]))
        return [
            Lease(
                job_id,
                attempts,
                parse_model(
                    bytes(blob), JobTemplate, what="stored job", reason=Reason.MALFORMED_PAYLOAD
                ),
                float(expires_at),
            )
            for job_id, attempts, blob, expires_at, _, _ in rows
        ]

    async def record_assignment(
        self, job_id: str, attempt: int, vehicle_id: str, digest: str, now: float
    ) -> None:
        await self._rows(
            "INSERT INTO assignments VALUES (%s, %s, %s, %s, %s) ON CONFLICT (job_id, attempt) "
            "DO UPDATE SET vehicle_id = EXCLUDED.vehicle_id, digest = EXCLUDED.digest, "
            "sent_at = EXCLUDED.sent_at",
            (job_id, attempt, vehicle_id, digest, now),
        )

    async def extend_lease(self, job_id: str, attempt: int, vehicle_id: str, now: float) -> bool:
        async with self._turn:
            cur = await self._conn.execute(
                "UPDATE jobs SET lease_expires = %s WHERE job_id = %s AND attempts = %s "
                "AND vehicle_id = %s AND state = 'leased'",
                (now + self.lease_s, job_id, attempt, vehicle_id),
            )
            return cur.rowcount == 1

    async def _end_lease(
        self, where: str, args: dict[str, Any], reason: str, now: float, *, failure: bool
    ) -> int:
        params = {**args, "f": int(failure), "max": self.max_attempts, "now": now, "reason": reason}
        async with self._turn:
            cur = await self._conn.execute(_END_LEASE.format(where=where), params)
            return cur.rowcount

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
        return await self._end_lease(
            "job_id = %(job)s AND attempts = %(attempt)s AND vehicle_id = %(vehicle)s",
            {"job": job_id, "attempt": attempt, "vehicle": vehicle_id},
            reason,
            now,
            failure=failure,
        )

    async def vehicle_offline(self, vehicle_id: str, now: float) -> int:
        return await self._end_lease(
            "vehicle_id = %(vehicle)s",
            {"vehicle": vehicle_id},
            "vehicle_offline",
            now,
            failure=False,
        )

    async def expire_leases(self, now: float) -> int:
        await self._rows(_EXPIRE_QUEUED, {"now": now})
        return await self._end_lease(
            "lease_expires < %(now)s", {}, "lease_expired", now, failure=True
        )

    async def complete(
        self, job_id: str, attempt: int, vehicle_id: str, digest: str, body: bytes, now: float
    ) -> Completion:
        # One statement: the check that this attempt was sent, the result and the job's
        # state change happen together, or not at all.
        ((sent, first),) = await self._rows(
            "WITH sent AS (SELECT 1 FROM assignments WHERE job_id = %(job)s AND attempt = "
            "%(attempt)s AND vehicle_id = %(vehicle)s AND digest = %(digest)s), "
            "kept AS (INSERT INTO results SELECT %(job)s, %(attempt)s, %(vehicle)s, %(body)s, "
            "%(now)s WHERE EXISTS (SELECT 1 FROM sent) ON CONFLICT (job_id) DO NOTHING "
            "RETURNING job_id), "
            "done AS (UPDATE jobs SET state = 'done', finished_at = %(now)s, "
            "lease_expires = NULL, vehicle_id = %(vehicle)s FROM kept "
            "WHERE jobs.job_id = kept.job_id RETURNING 1) "
            "SELECT (SELECT COUNT(*) FROM sent), (SELECT COUNT(*) FROM done)",
            {
                "job": job_id,
                "attempt": attempt,
                "vehicle": vehicle_id,
                "digest": digest,
                "body": body,
                "now": now,
            },
        )
        if not sent:
            return Completion.NOT_SENT
        return Completion.FIRST if first else Completion.DUPLICATE

    async def park(self, vehicle_id: str, models: Collection[str], now: float) -> None:
        await self._rows(
            "WITH gone AS (DELETE FROM parked WHERE vehicle_id = %(vehicle)s "
            "AND model_sha256 <> ALL(%(models)s::text[])) "
            "INSERT INTO parked SELECT %(vehicle)s, m, %(now)s, NULL "
            "FROM unnest(%(models)s::text[]) AS m ON CONFLICT (vehicle_id, model_sha256) "
            "DO UPDATE SET since = EXCLUDED.since, woken_at = NULL",
            {"vehicle": vehicle_id, "models": sorted(set(models)), "now": now},
        )

    async def wake(self, limit: int, now: float) -> list[str]:
        async with self._turn, self._conn.transaction():
            cur = await self._conn.execute(
                "SELECT EXISTS (SELECT 1 FROM parked WHERE woken_at IS NULL)"
            )
            row = await cur.fetchone()
            if row is None or not row[0]:
                return []
            cur = await self._conn.execute(
                "SELECT model_sha256, COUNT(*) FROM jobs WHERE state = 'queued' "
                "AND expires_at > %s GROUP BY model_sha256",
                (now,),
            )
            wanted = await cur.fetchall()
            await self._conn.execute(
                "DELETE FROM parked WHERE woken_at < %s", (now - WOKEN_FORGET_S,)
            )
            woken: list[str] = []
            for model, queued in wanted:
                cur = await self._conn.execute(
                    "SELECT COUNT(*) FROM parked WHERE model_sha256 = %s AND woken_at > %s",
                    (model, now - WOKEN_COVER_S),
                )
                (covered,) = await cur.fetchone() or (0,)
                n = min(int(queued) - int(covered), limit - len(woken))
                if n <= 0:
                    continue
                cur = await self._conn.execute(
                    "UPDATE parked SET woken_at = %s WHERE vehicle_id IN (SELECT vehicle_id "
                    "FROM parked WHERE model_sha256 = %s AND woken_at IS NULL ORDER BY since "
                    "LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING vehicle_id",
                    (now, model, n),
                )
                for (vehicle_id,) in await cur.fetchall():
                    if vehicle_id not in woken:
                        woken.append(vehicle_id)
            return woken

    async def counts(self) -> dict[str, int]:
        rows = await self._rows("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {str(state): int(n) for state, n in rows}

    async def summary(self) -> QueueSummary:
        counts = await self.counts()
        ((oldest, parked),) = await self._rows(
            "SELECT (SELECT MIN(leased_at) FROM jobs WHERE state = 'leased'), "
            "(SELECT COUNT(DISTINCT vehicle_id) FROM parked WHERE woken_at IS NULL)"
        )
        return QueueSummary(
            counts=counts,
            oldest_lease_at=oldest,
            parked_vehicles=int(parked),
        )

    async def state_of(self, job_id: str) -> tuple[str, int, str | None]:
        rows = await self._rows(
            "SELECT state, attempts, last_reason FROM jobs WHERE job_id = %s", (job_id,)
        )
        if not rows:
            raise KeyError(job_id)
        state, attempts, reason = rows[0]
        return str(state), int(attempts), reason

    async def failures_of(self, job_id: str) -> int:
        rows = await self._rows("SELECT failures FROM jobs WHERE job_id = %s", (job_id,))
        if not rows:
            raise KeyError(job_id)
        return int(rows[0][0])

    async def result_of(self, job_id: str) -> bytes | None:
        rows = await self._rows("SELECT body FROM results WHERE job_id = %s", (job_id,))
        return bytes(rows[0][0]) if rows else None

    async def close(self) -> None:
        await self._conn.close()
