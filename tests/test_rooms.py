"""Rooms of the runtime on their own, without a broker: the recorder's chain, the journal
following the lifecycle table, and the energy room's periodic save."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from agent.runtime import energy as energy_room
from agent.runtime.disk import StateDisk
from agent.runtime.energy import JobEnergy
from agent.runtime.journal import Journal
from agent.runtime.metrics import AgentMetrics
from agent.runtime.record import Happening, Recorder
from agent.state.jobs import JobStore
from agent.state.ledger import EnergyLedger
from agent.vehicle.snapshot import VehicleSnapshot
from agent.wire.messages import EventKind, JobEvent


def _recorder() -> tuple[Recorder, list[Happening], list[JobEvent]]:
    rec = Recorder("veh-1", AgentMetrics(enabled=True), clock=lambda: 100.0)
    seen: list[Happening] = []
    sent: list[JobEvent] = []
    rec.watch(seen.append)

    async def sink(event: JobEvent) -> None:
        sent.append(event)

    rec.connect(sink)
    return rec, seen, sent


async def test_a_jobs_happening_is_counted_measured_watched_and_sent():
    rec, seen, sent = _recorder()
    await rec.job(("job-1", 2), EventKind.REJECTED, "replayed", "seen before")
    assert rec.counts["rejected"] == 1 and rec.counts["rejected:replayed"] == 1
    sample = rec.metrics.registry.get_sample_value(  # type: ignore[union-attr]
        "edge_agent_jobs_total", {"kind": "rejected", "reason": "replayed"}
    )
    assert sample == 1.0
    assert [(h.kind, h.job, h.level) for h in seen] == [
        (EventKind.REJECTED, ("job-1", 2), "warning")
    ]
    assert [(e.job_id, e.attempt, e.kind, e.reason, e.detail, e.at) for e in sent] == [
        ("job-1", 2, EventKind.REJECTED, "replayed", "seen before", 100.0)
    ]


async def test_a_message_that_names_no_job_is_sent_without_ids():
    rec, _, sent = _recorder()
    await rec.job(None, EventKind.REJECTED, "malformed_envelope", "x" * 900)
    assert sent[0].job_id is None and sent[0].attempt is None
    assert len(sent[0].detail) == 500, "details are cut to what the wire allows"


def test_the_daemons_own_happenings_move_their_instruments():
    rec, seen, _ = _recorder()
    rec.note("reconnects", "reconnect_wait", delay_s=0.5)
    rec.note("policy_rejected.replayed")
    rec.log("info", "connected")
    assert rec.counts == {"reconnects": 1, "policy_rejected.replayed": 1}
    registry = rec.metrics.registry
    assert registry is not None
    assert registry.get_sample_value("edge_agent_reconnects_total") == 1.0
    assert (
        registry.get_sample_value("edge_agent_trust_policies_total", {"outcome": "replayed"}) == 1.0
    )
    assert [h.event for h in seen] == ["reconnect_wait", None, "connected"]
    assert seen[0].fields == {"delay_s": 0.5}


def test_a_watcher_can_stop_watching():
    rec, _, _ = _recorder()
    mine: list[Happening] = []
    stop = rec.watch(mine.append)
    rec.note("reconnects")
    stop()
    rec.note("reconnects")
    assert len(mine) == 1


async def test_the_journal_writes_what_the_table_says(tmp_path):
    jobs = JobStore(tmp_path / "state.db")
    rec, _, sent = _recorder()
    disk = StateDisk(tmp_path, jobs.probe, rec, clock=lambda: 100.0)
    journal = Journal(jobs, disk, rec, clock=lambda: 100.0)
    key = ("job-1", 1)
    jobs.remember("job-1", 1, 500.0, accepted=True, now=100.0)
    await journal.happened(key, EventKind.ACCEPTED)
    assert list(journal.held()) == [key]
    await journal.happened(key, EventKind.RUNNING)
    assert jobs.interrupted() == [("job-1", 1, "running")]
    await journal.happened(key, EventKind.PREEMPTED, "not_parked")
    assert jobs.interrupted() == [], "ended: the entry went"
    assert list(journal.held()) == []
    assert [e.kind for e in sent] == [EventKind.ACCEPTED, EventKind.RUNNING, EventKind.PREEMPTED]
    disk.close()


async def test_a_happening_the_table_lacks_is_logged_as_a_bug_and_the_job_still_ends(tmp_path):
    jobs = JobStore(tmp_path / "state.db")
    rec, seen, sent = _recorder()
    disk = StateDisk(tmp_path, jobs.probe, rec, clock=lambda: 100.0)
    journal = Journal(jobs, disk, rec, clock=lambda: 100.0)
    jobs.remember("job-1", 1, 500.0, accepted=True, now=100.0)
    await journal.happened(("job-1", 1), EventKind.SUCCEEDED)  # never accepted here
    assert [h.event for h in seen if h.level == "error"] == ["lifecycle_violation"]
    assert jobs.interrupted() == []
    assert [e.kind for e in sent] == [EventKind.SUCCEEDED]
    disk.close()


async def test_jobs_a_crash_interrupted_are_handed_back_once(tmp_path):
    jobs = JobStore(tmp_path / "state.db")
    jobs.remember("job-1", 3, 500.0, accepted=True, now=100.0)
    jobs.mark("job-1", 3, "running", 101.0)
    rec, _, sent = _recorder()
    disk = StateDisk(tmp_path, jobs.probe, rec, clock=lambda: 100.0)
    journal = Journal(jobs, disk, rec, clock=lambda: 100.0)
    await journal.hand_back_interrupted()
    await journal.hand_back_interrupted()
    assert [(e.job_id, e.attempt, e.kind, e.reason) for e in sent] == [
        ("job-1", 3, EventKind.RELEASED, "agent_restarted")
    ]
    assert jobs.interrupted() == []
    disk.close()


async def test_the_days_total_is_saved_while_a_job_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(energy_room, "SAVE_EVERY_S", 0.01)
    ledger = EnergyLedger(tmp_path / "state.db")
    jobs = JobStore(tmp_path / "state.db")
    rec, _, _ = _recorder()
    disk = StateDisk(tmp_path, jobs.probe, rec, clock=lambda: 100.0)

    def no_look(_now: float) -> VehicleSnapshot:
        raise AssertionError("saving the day's total looks at no car")

    energy = JobEnergy(
        ledger,
        disk,
        lambda at: dt.datetime.fromtimestamp(at, dt.UTC),
        clock=lambda: 100.0,
        look=no_look,
    )
    energy.meter.today_wh = 1.25
    running = asyncio.Event()
    task = asyncio.create_task(energy.run(running))
    await asyncio.sleep(0.05)
    assert ledger.day_total(energy.day) == 0.0, "nothing runs: nothing saved"
    running.set()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if ledger.day_total(energy.day) == pytest.approx(1.25):
            break
    task.cancel()
    assert ledger.day_total(energy.day) == pytest.approx(1.25)
    disk.close()
