"""The fleet's job store: one contract, two engines.

  - `sqlite`   the embedded default: the demo and a one-box fleet (one fleet node).
  - `postgres` PostgreSQL through psycopg 3: several fleet nodes share one store and lease
               with `SELECT ... FOR UPDATE SKIP LOCKED`.

The fleet node talks only to `JobStore`; `tests/test_store_contract.py` runs one suite
against both. Every method is async and none blocks the event loop: SQLite runs on one
thread of its own, PostgreSQL on psycopg's async connection.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Protocol

from broker.store.jobs import Completion, JobTemplate, Lease, QueueSummary

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class StoreError(Exception):
    """The job store cannot be opened or used; the message says what to do."""


class JobStore(Protocol):
    @property
    def lease_s(self) -> float: ...

    @property
    def max_attempts(self) -> int: ...

    async def submit(
        self,
        template: JobTemplate,
        *,
        now: float,
        job_id: str | None = None,
        expires_in_s: float = ...,
    ) -> str:
        """Queue a job that may wait for a car up to `expires_in_s` from now."""

    async def lease(
        self, vehicle_id: str, capacity: int, models: Collection[str], now: float
    ) -> list[Lease]:
        """Lease up to `capacity` queued, unexpired jobs for models the vehicle holds, oldest
        first; no job is ever leased to two callers at once."""

    async def record_assignment(
        self, job_id: str, attempt: int, vehicle_id: str, digest: str, now: float
    ) -> None: ...

    async def extend_lease(self, job_id: str, attempt: int, vehicle_id: str, now: float) -> bool:
        """The vehicle says it still holds this attempt: its lease runs from now again."""

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
        """The lessee ended this attempt; `failure` says whether it counts against the job."""

    async def vehicle_offline(self, vehicle_id: str, now: float) -> int:
        """The car went offline: its leased jobs are queued again, no failure counted."""

    async def expire_leases(self, now: float) -> int:
        """Leases that ran out count as a failure; queued jobs past their expiry fail."""

    async def complete(
        self, job_id: str, attempt: int, vehicle_id: str, digest: str, body: bytes, now: float
    ) -> Completion:
        """Record a verified result in one step: refused unless this attempt, with this
        digest, was sent to this vehicle; kept if it is the job's first."""

    async def park(self, vehicle_id: str, models: Collection[str], now: float) -> None:
        """The vehicle asked and got nothing: it waits to be woken for these models."""

    async def wake(self, limit: int, now: float) -> list[str]:
        """Up to `limit` parked vehicles holding a model with queued jobs (no more than there
        are such jobs), taken off the parked list: the fleet tells them to ask."""

    async def counts(self) -> dict[str, int]: ...

    async def summary(self) -> QueueSummary: ...

    async def state_of(self, job_id: str) -> tuple[str, int, str | None]:
        """(state, attempts, last reason); KeyError for an unknown job."""

    async def failures_of(self, job_id: str) -> int: ...

    async def result_of(self, job_id: str) -> bytes | None:
        """The encoded result body accepted for the job, if any."""

    async def close(self) -> None: ...


async def open_store(
    where: str | Path, *, lease_s: float = 30.0, max_attempts: int = 3
) -> JobStore:
    """`postgresql://...` opens PostgreSQL; anything else is the path of a SQLite file."""
    text = str(where)
    if text.startswith(POSTGRES_SCHEMES):
        try:
            from broker.store.postgres import PostgresStore
        except ImportError:
            raise StoreError(
                "the PostgreSQL store needs psycopg: pip install 'vehicle-edge-agent[postgres]'"
            ) from None

        return await PostgresStore.connect(text, lease_s=lease_s, max_attempts=max_attempts)
    from broker.store.sqlite import SqliteStore

    path = Path(text)
    if not path.parent.is_dir():
        raise StoreError(
            f"cannot open the queue {path}: the folder {path.parent} does not exist "
            f"(mkdir -p {path.parent})"
        )
    return SqliteStore.open(path, lease_s=lease_s, max_attempts=max_attempts)
