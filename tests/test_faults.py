"""Fault tests against real processes and a real broker: kills, outages, restarts, bad state dirs."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import sys
import time

import pytest

from agent.state.jobs import JobStore
from broker.collector import Collector
from broker.fleet import FleetNode
from broker.local import LocalMosquitto
from broker.store.jobs import JobTemplate
from broker.store.sqlite import JobQueue, SqliteStore
from tests.support import (
    BURN_REF,
    job_spec,
    observing,
    refused_at_start,
    running_agent,
    signed,
    wait_for,
    write_vehicle,
)

pytestmark = pytest.mark.broker


def _burn_template(fleet, rows: int) -> JobTemplate:
    import numpy as np

    from agent.wire.keys import raw_public
    from agent.wire.messages import Limits
    from agent.wire.tensors import Tensor

    return JobTemplate(
        job_class="burn",
        model=BURN_REF,
        inputs={
            "x": Tensor.from_numpy(np.ones((1, 256), np.float32)),
            "rows_by_256": Tensor.from_numpy(np.array([rows, 256], np.int64)),
        },
        limits=Limits(max_runtime_s=30),
        requester_key=raw_public(fleet.requester.public_key()),
        lifetime_s=600,
    )


def _start_agent(files) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(files.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@contextlib.asynccontextmanager
async def _fleet(port: int, fleet, files, tmp_path, jobs: int, rows: int):
    queue = JobQueue(tmp_path / "fleet.db", lease_s=4.0, max_attempts=20)
    collector = Collector(
        vehicles={files.vehicle_id: files.key.public_key()},
        requester_key=fleet.requester,
        digest_for=queue.assignment_digest,
    )
    node = FleetNode(
        host="127.0.0.1",
        port=port,
        store=SqliteStore(queue),
        signing_key=fleet.job_key,
        collector=collector,
        lease_tick_s=0.2,
    )
    ids = [queue.submit(_burn_template(fleet, rows), now=time.time()) for _ in range(jobs)]
    task = asyncio.create_task(node.run(), name="fleet")
    try:
        await wait_for(node.ready.is_set, what="fleet ready")
        yield node, queue, collector, ids
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        queue.close()


async def test_sigkill_at_random_points_loses_no_result(fleet, tmp_path):
    """Killing the agent with SIGKILL at random points and restarting it: every job ends with
    exactly one verified result at the collector; redeliveries are suppressed as duplicates."""
    rng = random.Random(5)
    with LocalMosquitto(tmp_path / "mq") as mq:
        files = write_vehicle(
            tmp_path,
            "veh-kill",
            port=mq.port,
            fleet=fleet,
            limits="power_cap_w = 2000",
            extra="worker_idle_s = 30",
        )
        async with _fleet(mq.port, fleet, files, tmp_path, jobs=40, rows=3000) as (
            _node,
            queue,
            collector,
            ids,
        ):
            proc = _start_agent(files)
            kills = 0
            try:
                for _ in range(3):
                    await asyncio.sleep(rng.uniform(1.5, 3.0))
                    proc.send_signal(signal.SIGKILL)
                    await asyncio.to_thread(proc.wait, 10)
                    kills += 1
                    proc = _start_agent(files)
                await wait_for(
                    lambda: len(collector.results) == len(ids),
                    timeout=90,
                    what="every job's result",
                )
            finally:
                proc.terminate()
                await asyncio.to_thread(proc.wait, 15)
            assert set(collector.results) == set(ids)
            assert queue.counts() == {"done": len(ids)}
            assert kills == 3
            print(
                f"jobs {len(ids)}, kills {kills}, results {len(collector.results)}, "
                f"duplicates suppressed {collector.duplicates}"
            )


async def test_broker_outage_longer_than_keepalive_loses_no_result(fleet, tmp_path):
    """The broker stops for longer than the keepalive (and forgets every session); when it is back,
    agent and fleet reconnect and every job still ends with exactly one result."""
    with LocalMosquitto(tmp_path / "mq") as mq:
        port = mq.port
        files = write_vehicle(
            tmp_path,
            "veh-outage",
            port=port,
            fleet=fleet,
            limits="power_cap_w = 2000",
            extra="worker_idle_s = 30",
        )
        files.config_path.write_text(
            files.config_path.read_text().replace("[broker]\n", "[broker]\nkeepalive_s = 5\n")
        )
        async with _fleet(port, fleet, files, tmp_path, jobs=30, rows=3000) as (
            node,
            _queue,
            collector,
            ids,
        ):
            proc = _start_agent(files)
            try:
                await wait_for(lambda: len(collector.results) >= 5, timeout=30, what="some results")
                mq.stop()
                await asyncio.sleep(6.5)  # > keepalive; persistence is off: sessions are gone
                restarted = LocalMosquitto(tmp_path / "mq2", port=port)
                restarted.start()
                try:
                    await wait_for(
                        lambda: len(collector.results) == len(ids),
                        timeout=90,
                        what="every job's result after the outage",
                    )
                finally:
                    proc.terminate()
                    await asyncio.to_thread(proc.wait, 15)
                    restarted.stop()
            finally:
                if proc.poll() is None:
                    proc.kill()
            assert set(collector.results) == set(ids)
            assert node.reconnects >= 1


async def test_jobs_interrupted_by_a_crash_are_handed_back_at_the_next_start(
    mosquitto, fleet, tmp_path
):
    """A job journaled as running by a run that died is reported released (agent_restarted)."""
    files = write_vehicle(tmp_path, "veh-journal", port=mosquitto.port, fleet=fleet)
    store = JobStore(files.config_path.parent / "state" / "state.db")
    store.remember("job-lost", 3, time.time() + 60, accepted=True, now=time.time())
    store.mark("job-lost", 3, "running", time.time())
    store.close()
    async with observing(mosquitto.port, "veh-journal") as obs, running_agent(files):
        await wait_for(lambda: "released" in obs.kinds("job-lost"), what="handed back")
        event = next(e for e in obs.events if e.get("job_id") == "job-lost")
        assert (event["attempt"], event["reason"]) == (3, "agent_restarted")
    assert JobStore(files.config_path.parent / "state" / "state.db").interrupted() == []


def test_outbox_and_replay_record_survive_restart(tmp_path):
    """A sealed result in the outbox and a seen job id are still there after a reopen."""
    path = tmp_path / "state.db"
    store = JobStore(path)
    store.remember("job-1", 1, time.time() + 60, accepted=True, now=time.time())
    seq = store.finish_with_result("job-1", 1, "t", b"sealed", time.time())
    store.close()
    again = JobStore(path)
    assert again.outbox_batch() == [(seq, "t", b"sealed", "job-1", 1)]
    assert ("job-1", 1) in again.load_seen(time.time())
    assert again.prune_seen(time.time() + 120) == 1
    assert again.interrupted() == [], "the result closed the journal entry"
    again.outbox_remove(seq)
    assert again.outbox_size() == 0
    assert ("job-1", 1) not in again.load_seen(time.time() + 120), "expired entries are dropped"


def test_unwritable_state_directory_refuses_to_start(tmp_path, fleet):
    """A state directory that cannot be created stops the agent at start with EX_CONFIG and the path."""
    files = write_vehicle(tmp_path, "veh-nostate", port=1, fleet=fleet)
    blocker = files.config_path.parent / "state"
    blocker.write_text("a file where the state directory should be")
    printed = refused_at_start(files.config_path)
    assert "state database" in printed and "writable" in printed


@pytest.mark.parametrize(("grace", "outcome"), [(10.0, "finished"), (0.3, "handed_back")])
async def test_sigterm_during_a_long_job(fleet, tmp_path, grace, outcome):
    """SIGTERM mid-job: with time to spare the job finishes and its result is delivered before the
    agent exits; with a short grace it is handed back and completed on the next run."""
    with LocalMosquitto(tmp_path / "mq") as mq:
        files = write_vehicle(
            tmp_path,
            "veh-term",
            port=mq.port,
            fleet=fleet,
            limits="power_cap_w = 2000",
            extra=f"shutdown_grace_s = {grace}",
        )
        async with _fleet(mq.port, fleet, files, tmp_path, jobs=1, rows=40_000) as (
            node,
            queue,
            collector,
            ids,
        ):
            proc = _start_agent(files)
            try:
                await wait_for(
                    lambda: node.events["veh-term"]["running"] >= 1, timeout=20, what="job running"
                )
                await asyncio.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
                rc = await asyncio.to_thread(proc.wait, 30)
                assert rc == 0
                if outcome == "finished":
                    await wait_for(lambda: set(collector.results) == set(ids), what="result")
                    assert node.events["veh-term"]["preempted"] == 0
                else:
                    await wait_for(lambda: queue.counts().get("queued") == 1, what="requeued")
                    assert collector.results == {}
                    proc = _start_agent(files)
                    await wait_for(
                        lambda: set(collector.results) == set(ids),
                        timeout=60,
                        what="completed on the next run",
                    )
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    await asyncio.to_thread(proc.wait, 15)


async def test_heartbeats_keep_a_long_job_leased(fleet, tmp_path):
    """A job longer than its lease is not handed to anyone else while the vehicle heartbeats."""
    with LocalMosquitto(tmp_path / "mq") as mq:
        files = write_vehicle(
            tmp_path,
            "veh-beat",
            port=mq.port,
            fleet=fleet,
            limits="power_cap_w = 2000",
            extra="heartbeat_s = 0.3",
        )
        async with _fleet(mq.port, fleet, files, tmp_path, jobs=1, rows=60_000) as (
            node,
            queue,
            collector,
            ids,
        ):
            queue.lease_s = 1.0
            proc = _start_agent(files)
            try:
                await wait_for(
                    lambda: set(collector.results) == set(ids), timeout=60, what="result"
                )
            finally:
                proc.terminate()
                await asyncio.to_thread(proc.wait, 15)
            assert queue.state_of(ids[0])[:2] == ("done", 1), "one attempt: never re-leased"
            assert node.events["veh-beat"]["heartbeat"] >= 2


async def test_a_clock_set_backwards_does_not_revive_expired_jobs(mosquitto, fleet, tmp_path):
    """After seeing a job issued at T, an agent whose clock jumps back an hour still treats jobs
    that expired before T as expired, and keeps that floor across a restart."""
    from agent.assembly import build_agent
    from agent.config import load_config
    from tests.support import job_spec, signed

    files = write_vehicle(tmp_path, "veh-clock", port=mosquitto.port, fleet=fleet)
    real = time.time()
    offset = [0.0]

    def clock() -> float:
        return real + offset[0]

    async def serve_once(jobs: list[bytes], expect: list[str]) -> list[dict]:
        agent = build_agent(load_config(files.config_path), clock=clock)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            async with observing(mosquitto.port, "veh-clock") as obs:
                await wait_for(lambda: agent.status()["connected"], what="connected")
                for raw in jobs:
                    await obs.send_job(raw)
                await wait_for(
                    lambda: len([e for e in obs.events if e["kind"] in expect]) >= len(jobs),
                    what="verdicts",
                )
                return list(obs.events)
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=15)

    fresh = signed(job_spec(fleet, "veh-clock", job_id="fresh", issued_at=real), fleet.job_key)
    await serve_once([fresh], ["accepted"])
    offset[0] = -3600.0  # the clock is set back an hour
    stale = signed(
        job_spec(fleet, "veh-clock", job_id="stale", issued_at=real - 3650, lifetime_s=600),
        fleet.job_key,
    )
    current = signed(job_spec(fleet, "veh-clock", job_id="current", issued_at=real), fleet.job_key)
    events = await serve_once([stale, current], ["rejected", "accepted"])
    verdicts = {
        e["job_id"]: (e["kind"], e.get("reason"))
        for e in events
        if e["kind"] in ("rejected", "accepted")
    }
    assert verdicts["stale"] == ("rejected", "expired")
    assert verdicts["current"] == ("accepted", None), "not taken for a job from the future"


async def test_replay_record_forgets_expired_jobs_in_memory_and_on_disk(fleet, tmp_path):
    """A long-running agent prunes job ids whose jobs expired, so its replay record stays bounded."""
    from agent.assembly import build_agent
    from agent.config import load_config
    from agent.state.jobs import JobStore

    files = write_vehicle(tmp_path, "veh-prune", port=1, fleet=fleet)
    agent = build_agent(load_config(files.config_path))
    now = time.time()
    journal = JobStore(files.config_path.parent / "state" / "state.db")
    agent.intake.seen[("old", 1)] = now - 10
    agent.intake.seen[("live", 1)] = now + 600
    journal.remember("old", 1, now - 10, accepted=False, now=now)
    await agent.intake.prune()
    assert set(agent.intake.seen) == {("live", 1)}
    assert ("old", 1) not in journal.load_seen(now - 100)


async def test_a_worker_that_cannot_start_hands_jobs_back_then_stops_asking_for_work(
    mosquitto, fleet, tmp_path, monkeypatch
):
    """onnxruntime crashing at import (as 1.28+ does on aarch64 under qemu-user): every job
    is handed back, none used up, and after the second failure in a row the car stops
    asking for work for a while instead of taking and returning a job every 2 s."""
    broken = tmp_path / "broken"
    (broken / "onnxruntime").mkdir(parents=True)
    (broken / "onnxruntime" / "__init__.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(broken))  # the worker's import path, not ours
    files = write_vehicle(tmp_path, "veh-noworker", port=mosquitto.port, fleet=fleet)
    async with observing(mosquitto.port, "veh-noworker") as obs, running_agent(files) as agent:
        for n in (1, 2):
            await obs.send_job(
                signed(job_spec(fleet, "veh-noworker", job_id=f"j{n}"), fleet.job_key)
            )
            await wait_for(
                lambda n=n: "released" in obs.kinds(f"j{n}"), timeout=20, what=f"j{n} back"
            )
        released = [e for e in obs.events if e["kind"] == "released"]
        assert {e["reason"] for e in released} == {"worker_unavailable"}
        assert "SIGSEGV" in released[0]["detail"]
        assert not any(e["kind"] == "failed" for e in obs.events), "no attempt used up"
        assert not agent.executor.worker_may_start()
        asked = len(obs.work)
        await asyncio.sleep(3.0)  # more than the 0.3 s work-request interval of this config
        assert len(obs.work) == asked, "no work asked for while the worker cannot start"
