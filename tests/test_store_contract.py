"""The job store's contract, run against both engines: SQLite (embedded) and PostgreSQL (a
real cluster started for the session on a free loopback port)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from broker.store import JobStore, StoreError, open_store
from broker.store.jobs import Completion
from broker.store.postgres import PostgresStore
from tests.support import DIGITS_REF
from tests.test_fleet import template

DIGITS = {DIGITS_REF.sha256}
OTHER = "0" * 64
NOT_SENT, DUPLICATE = Completion.NOT_SENT, Completion.DUPLICATE


@pytest.fixture(params=["sqlite", "postgres"])
def where(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "queue.db")
    return request.getfixturevalue("pg_dsn")


@pytest.fixture
async def store(where: str) -> AsyncIterator[JobStore]:
    s = await open_store(where, lease_s=10, max_attempts=2)
    yield s
    await s.close()


async def _submit(store: JobStore, n: int = 1, **kw) -> list[str]:
    req = X25519PrivateKey.generate()
    return [await store.submit(template(req), now=float(i), **kw) for i in range(n)]


async def test_leases_go_oldest_first_only_for_held_models(store):
    """Leases go oldest first, up to capacity, and only for models the vehicle holds."""
    ids = await _submit(store, 3)
    assert await store.lease("v1", 5, {OTHER}, now=10) == []
    leases = await store.lease("v1", 2, DIGITS, now=10)
    assert [(lease.job_id, lease.attempt) for lease in leases] == [(ids[0], 1), (ids[1], 1)]
    assert leases[0].template.model == DIGITS_REF
    assert await store.counts() == {"leased": 2, "queued": 1}


async def test_requeued_on_hand_back_and_expiry_then_failed_after_max_attempts(store):
    """A job comes back on hand-back or lease expiry, and fails after max_attempts failures."""
    (job,) = await _submit(store)
    await store.lease("v1", 1, DIGITS, now=1)
    assert await store.hand_back(job, 1, "v2", "released", now=2) == 0, "only the lessee"
    assert await store.hand_back(job, 1, "v1", "gate_closed", now=2) == 1
    assert await store.state_of(job) == ("queued", 1, "gate_closed")
    await store.lease("v1", 1, DIGITS, now=3)
    assert await store.expire_leases(now=12) == 0
    assert await store.expire_leases(now=14) == 1
    assert await store.state_of(job) == ("failed", 2, "lease_expired")


async def test_a_heartbeat_extends_only_the_current_lease(store):
    (job,) = await _submit(store)
    await store.lease("v1", 1, DIGITS, now=0)
    assert await store.extend_lease(job, 1, "v1", now=8) is True
    assert await store.extend_lease(job, 2, "v1", now=8) is False, "another attempt"
    assert await store.extend_lease(job, 1, "v2", now=8) is False, "another vehicle"
    assert await store.expire_leases(now=15) == 0, "the lease runs from the heartbeat"
    assert await store.expire_leases(now=19) == 1


async def test_preemptions_never_use_up_a_job_only_its_expiry_ends_it(where):
    """Fifty preemptions leave the job queued with no failure counted, each lease a new
    attempt; once its own expiry passes, the next hand-back fails it as expired."""
    store = await open_store(where, lease_s=10, max_attempts=3)
    (job,) = await _submit(store, expires_in_s=100)
    for i in range(50):
        (lease,) = await store.lease("v1", 1, DIGITS, now=1 + i)
        assert lease.attempt == i + 1 and lease.expires_at == 100
        await store.hand_back(job, lease.attempt, "v1", "not_parked", 1.5 + i, failure=False)
    assert await store.state_of(job) == ("queued", 50, "not_parked")
    assert await store.failures_of(job) == 0
    (lease,) = await store.lease("v1", 1, DIGITS, now=99)
    await store.hand_back(job, lease.attempt, "v1", "not_parked", 101, failure=False)
    assert await store.state_of(job) == ("failed", 51, "expired")
    await store.close()


async def test_a_queued_job_past_its_expiry_is_never_leased_and_fails(store):
    (job,) = await _submit(store, expires_in_s=5)
    assert await store.lease("v1", 1, DIGITS, now=6) == []
    await store.expire_leases(now=6)
    assert await store.state_of(job) == ("failed", 0, "expired")
    with pytest.raises(ValueError, match="positive"):
        await _submit(store, expires_in_s=0)


async def test_failures_of_the_job_itself_fail_it_after_max_attempts(where):
    store = await open_store(where, max_attempts=3)
    (job,) = await _submit(store)
    outcomes = ["worker_crashed", "not_parked", "worker_crashed", "gate_closed", "worker_crashed"]
    for t, reason in enumerate(outcomes):
        (lease,) = await store.lease("v1", 1, DIGITS, now=t)
        await store.hand_back(
            job, lease.attempt, "v1", reason, t + 0.5, failure=reason == "worker_crashed"
        )
    assert await store.state_of(job) == ("failed", 5, "worker_crashed")
    assert await store.failures_of(job) == 3
    await store.close()


async def test_an_offline_vehicle_returns_its_jobs_without_a_failure(store):
    jobs = await _submit(store, 2)
    await store.lease("v1", 2, DIGITS, now=1)
    assert await store.vehicle_offline("v1", now=2) == 2
    assert [(await store.state_of(j))[0] for j in jobs] == ["queued", "queued"]
    assert await store.failures_of(jobs[0]) == 0


async def test_a_result_counts_only_for_what_was_sent_and_the_first_wins(store):
    (job,) = await _submit(store)
    await store.lease("v1", 1, DIGITS, now=1)
    await store.record_assignment(job, 1, "v1", "d" * 64, now=1)
    assert await store.complete(job, 1, "v2", "d" * 64, b"forged", now=2) is NOT_SENT
    assert await store.complete(job, 1, "v1", "e" * 64, b"forged", now=2) is NOT_SENT
    assert await store.complete(job, 2, "v1", "d" * 64, b"forged", now=2) is NOT_SENT
    assert await store.result_of(job) is None and (await store.state_of(job))[0] == "leased"
    assert await store.complete(job, 1, "v1", "d" * 64, b"first", now=2) is Completion.FIRST
    await store.lease("v1", 1, DIGITS, now=3)  # (nothing queued: no second attempt)
    assert await store.complete(job, 1, "v1", "d" * 64, b"again", now=3) is DUPLICATE
    assert await store.result_of(job) == b"first"
    assert (await store.state_of(job))[0] == "done"
    assert await store.hand_back(job, 1, "v1", "released", now=4) == 0, "done stays done"


async def test_a_parked_vehicle_is_woken_once_and_only_for_its_models(store):
    """Cars told 'no work' park; queued work for a model they hold wakes at most as many of
    them as there are jobs, each once; leasing takes a car off the list."""
    for vid in ("v1", "v2", "v3"):
        await store.park(vid, DIGITS, now=1)
    await store.park("v4", {OTHER}, now=1)
    assert await store.wake(100, now=2) == [], "nothing queued"
    await _submit(store, 2)
    woken = await store.wake(100, now=3)
    assert sorted(woken) == ["v1", "v2"], "two jobs wake the two longest parked"
    assert await store.wake(100, now=4) == [], "woken cars are on their way: no more for now"
    assert await store.wake(100, now=9) == ["v3"], "they did not come: wake another"
    assert await store.wake(100, now=10) == [], "nobody left to wake"
    await store.park("v1", DIGITS, now=11)  # v1 asked after all, and found nothing
    assert (await store.summary()).parked_vehicles == 2, "v1 and v4 (never woken)"
    await store.lease("v1", 1, DIGITS, now=12)
    assert (await store.summary()).parked_vehicles == 1, "leasing unparks"


async def test_summary_counts_states_and_dates_the_oldest_lease(store):
    await _submit(store, 3)
    await store.lease("v1", 1, DIGITS, now=100)
    await store.lease("v2", 1, DIGITS, now=105)
    summary = await store.summary()
    assert summary.counts == {"queued": 1, "leased": 2}
    assert summary.oldest_lease_at == 100


async def test_a_job_is_never_leased_twice_by_concurrent_stores(where):
    """Several stores on one database (the replicas' view) asking at once: every job is
    leased exactly once."""
    stores = [await open_store(where) for _ in range(3)]
    await _submit(stores[0], 60)
    got = await asyncio.gather(
        *(s.lease(f"v{i}-{k}", 2, DIGITS, now=1) for k in range(10) for i, s in enumerate(stores))
    )
    leased = [lease.job_id for batch in got for lease in batch]
    assert len(leased) == 60 and len(set(leased)) == 60
    for s in stores:
        await s.close()


async def test_a_bad_store_address_is_a_clear_error(tmp_path, postgres):
    with pytest.raises(StoreError, match="does not exist"):
        await open_store(tmp_path / "no" / "such" / "queue.db")
    with pytest.raises(StoreError, match=r"cannot connect to the PostgreSQL store at 127\.0\.0\.1"):
        await open_store(f"postgresql://edge:secret@127.0.0.1:{postgres.port}/no_such_db")
    with pytest.raises(StoreError) as refused:
        await open_store(f"postgresql://edge:secret@127.0.0.1:{postgres.port}/no_such_db")
    assert "secret" not in str(refused.value), "the password is never printed"
    assert not isinstance(await open_store(tmp_path / "q.db"), PostgresStore)
