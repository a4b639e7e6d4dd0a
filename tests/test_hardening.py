"""What outside testers broke, each against a real agent and a real broker: one job's failure
stays that job's, a requester key no result can be sealed to, an empty tensor, the clock
floor, a worker killed from outside, a full state disk, and energy booked per job."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import inspect
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

import agent.core.intake
import agent.runtime.link
import agent.runtime.results
from agent.assembly import build_agent
from agent.config import load_config
from agent.inference.engine import WorkerEngine
from agent.state.jobs import JobStore
from agent.state.ledger import EnergyLedger
from agent.wire.tensors import Tensor
from broker.policy import make_policy
from tests.support import (
    burn_spec,
    job_spec,
    observing,
    running_agent,
    signed,
    wait_for,
    write_vehicle,
)

pytestmark = pytest.mark.broker

# The all-zero key and the point of order 8: no shared secret can be agreed with either.
LOW_ORDER = [
    bytes(32),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
]


def _reasons(obs, kind: str, job_id: str | None = "job-1") -> list[str]:
    return [e.get("reason") for e in obs.events if e["kind"] == kind and e.get("job_id") == job_id]


async def _serves_next(obs, fleet, vid: str, job_id: str = "job-next") -> None:
    """The daemon still serves: a fresh job runs to a result."""
    before = len(obs.results)
    await obs.send_job(signed(job_spec(fleet, vid, job_id=job_id), fleet.job_key))
    await wait_for(lambda: "succeeded" in obs.kinds(job_id), timeout=20, what=f"{job_id} ran")
    assert len(obs.results) == before + 1


# ---- a requester key no result can be sealed to ------------------------------------------


@pytest.mark.parametrize("trust", ["keys", "policy"])
@pytest.mark.parametrize("key", LOW_ORDER, ids=["zero", "order8"])
async def test_a_low_order_requester_key_is_refused_at_admission(
    mosquitto, fleet, tmp_path, trust, key
):
    """A job whose requester key is a low-order X25519 point is rejected (bad_requester_key, or
    requester_not_allowed where the policy names requesters) before it runs; nothing is
    published, and the daemon serves the next job."""
    vid = f"veh-lo-{trust}"
    files = write_vehicle(tmp_path, vid, port=mosquitto.port, fleet=fleet, trust=trust)
    async with observing(mosquitto.port, vid) as obs, running_agent(files) as agent:
        await obs.send_job(signed(job_spec(fleet, vid, requester_key=key), fleet.job_key))
        await wait_for(lambda: "rejected" in obs.kinds(), what="rejected")
        expected = "bad_requester_key" if trust == "keys" else "requester_not_allowed"
        assert _reasons(obs, "rejected") == [expected]
        assert "accepted" not in obs.kinds()
        await _serves_next(obs, fleet, vid)
        assert agent.counts.get("accepted") == 1


def test_a_trust_policy_naming_a_low_order_requester_is_refused(fleet):
    """The fleet cannot sign such a policy, and one crafted by hand fails to parse, with the
    requester named."""
    with pytest.raises(ValueError, match="low-order"):
        make_policy(
            version=2,
            roots=[fleet.root.public_key()],
            threshold=1,
            job_keys=[fleet.job_key.public_key()],
            requesters=[X25519PublicKey.from_public_bytes(LOW_ORDER[1])],
        )


def test_the_low_order_check_agrees_with_cryptography():
    """Every encoding of every low-order u (and random keys) is judged as cryptography's X25519
    exchange judges it."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from agent.wire.keys import x25519_agreeable

    p = 2**255 - 19
    low = [0, 1, p - 1] + [int.from_bytes(k, "little") for k in LOW_ORDER[1:]]
    low.append(39382357235489614581723060781553021112529911719440698176882885853963445705823)
    candidates = set()
    for u in low:
        for v in (u, u + p):
            for high_bit in (0, 1 << 255):
                if v < 2**255:
                    candidates.add(v | high_bit)
    rng = np.random.default_rng(5)
    candidates |= {int.from_bytes(rng.bytes(32), "little") for _ in range(200)}
    probe = X25519PrivateKey.generate()
    for u in candidates:
        raw = u.to_bytes(32, "little")
        try:
            probe.exchange(X25519PublicKey.from_public_bytes(raw))
            agreeable = True
        except ValueError:
            agreeable = False
        assert x25519_agreeable(raw) is agreeable, hex(u)


# ---- fault injection: one job's failure stays that job's -----------------------------------


def _fail_once(
    monkeypatch: pytest.MonkeyPatch,
    owner: Any,
    name: str,
    error: BaseException,
    when: Callable[..., bool] = lambda *a, **k: True,
) -> dict[str, int]:
    """Make `owner.name` raise `error` the first time `when(*args)` holds."""
    original = getattr(owner, name)
    left = {"n": 1}

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def broken_async(*args: Any, **kwargs: Any) -> Any:
            if left["n"] and when(*args, **kwargs):
                left["n"] -= 1
                raise error
            return await original(*args, **kwargs)

        monkeypatch.setattr(owner, name, broken_async)
    else:

        @functools.wraps(original)
        def broken(*args: Any, **kwargs: Any) -> Any:
            if left["n"] and when(*args, **kwargs):
                left["n"] -= 1
                raise error
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, broken)
    return left


STAGES = {
    # stage: (where, name, error, event kind, reason, or None where the result must arrive)
    "parse": (
        agent.core.intake,
        "parse_model",
        RuntimeError("parser bug"),
        "rejected",
        "agent_error",
    ),
    "admit": (agent.core.intake, "admit", KeyError("admission bug"), "rejected", "agent_error"),
    "worker start": (
        asyncio,
        "create_subprocess_exec",
        OSError(errno.ENOMEM, "Cannot allocate memory"),
        "released",
        "worker_unavailable",
    ),
    "run": (WorkerEngine, "run", RuntimeError("engine bug"), "failed", "agent_error"),
    "seal": (
        agent.runtime.results,
        "seal",
        ValueError("Error computing shared key."),
        "failed",
        "agent_error",
    ),
    "outbox": (
        JobStore,
        "finish_with_result",
        sqlite3.OperationalError("database or disk is full"),
        "succeeded",
        None,
    ),
    "publish": (
        agent.runtime.link,
        "publish_acked",
        ValueError("payload too large"),
        "failed",
        "agent_error",
    ),
}


@pytest.mark.parametrize("stage", list(STAGES))
async def test_a_fault_at_any_stage_fails_only_that_job(
    mosquitto, fleet, tmp_path, monkeypatch, stage
):
    """An exception injected at one stage of one job's handling ends as a typed event for that
    job (or, for a disk that refused the outbox write, the result delivered once it takes
    writes again); the daemon keeps serving and the next job runs to a result."""
    owner, name, error, kind, reason = STAGES[stage]
    vid = "veh-fault-" + stage.replace(" ", "-")
    files = write_vehicle(tmp_path, vid, port=mosquitto.port, fleet=fleet)
    when: Callable[..., bool] = lambda *a, **k: True  # noqa: E731
    if stage == "publish":  # only the result, not the events and statuses
        when = lambda client, topic, *a, **k: topic.endswith("/results")  # noqa: E731
    async with observing(mosquitto.port, vid) as obs, running_agent(files) as agent_:
        left = _fail_once(monkeypatch, owner, name, error, when)
        await obs.send_job(signed(job_spec(fleet, vid), fleet.job_key))
        job_id = None if stage == "parse" else "job-1"
        await wait_for(
            lambda: any(e["kind"] == kind and e.get("job_id") == job_id for e in obs.events),
            timeout=20,
            what=f"{kind} after a fault at {stage}",
        )
        assert left["n"] == 0, "the fault was injected"
        if reason is not None:
            assert reason in _reasons(obs, kind, job_id)
            assert "succeeded" not in obs.kinds(job_id)
        else:
            assert len(obs.results) == 1, "the result was held, then delivered"
            assert agent_.counts["state_write_failed"] >= 1
        await _serves_next(obs, fleet, vid)
        assert agent_.status()["gate"]["open"]


# ---- an empty tensor -------------------------------------------------------------------


async def test_an_empty_input_tensor_is_refused_at_admission(mosquitto, fleet, tmp_path):
    """Shape [0, 64] with no data is rejected as bad_inputs before anything runs."""
    vid = "veh-empty"
    files = write_vehicle(tmp_path, vid, port=mosquitto.port, fleet=fleet)
    empty = {"X": Tensor.from_numpy(np.zeros((0, 64), np.float32))}
    async with observing(mosquitto.port, vid) as obs, running_agent(files):
        await obs.send_job(signed(job_spec(fleet, vid, inputs=empty), fleet.job_key))
        await wait_for(lambda: "rejected" in obs.kinds(), what="rejected")
        assert _reasons(obs, "rejected") == ["bad_inputs"]
        assert "empty tensor" in next(e["detail"] for e in obs.events if e["kind"] == "rejected")
        await _serves_next(obs, fleet, vid)


# ---- the clock floor -------------------------------------------------------------------


async def test_jobs_issued_ahead_cannot_walk_the_clock_floor_forward(mosquitto, fleet, tmp_path):
    """Fifteen jobs each issued 59 s after the last (the skew allows 60 s ahead): the floor
    never passes the local clock, so the chain stops at its second link, and an honest job
    valid for 600 s still runs."""
    vid = "veh-floor"
    files = write_vehicle(tmp_path, vid, port=mosquitto.port, fleet=fleet)
    async with observing(mosquitto.port, vid) as obs, running_agent(files) as agent_:
        now = time.time()
        for i in range(1, 16):
            issued = now + 59.0 * i
            spec = job_spec(fleet, vid, job_id=f"ahead-{i}", issued_at=issued, lifetime_s=600)
            await obs.send_job(signed(spec, fleet.job_key))
        await wait_for(
            lambda: sum(e["kind"] in ("rejected", "succeeded") for e in obs.events) >= 15,
            timeout=30,
            what="all 15 answered",
        )
        assert agent_.trusted_now() - time.time() < 1.0, "the floor stays at the local clock"
        assert "rejected" not in obs.kinds("ahead-1")
        assert _reasons(obs, "rejected", "ahead-2") == ["not_yet_valid"]
        honest = job_spec(fleet, vid, job_id="honest", lifetime_s=600)
        await obs.send_job(signed(honest, fleet.job_key))
        await wait_for(lambda: "succeeded" in obs.kinds("honest"), what="honest job ran")


async def test_a_fresh_state_directory_takes_the_policy_issue_time_as_its_floor(
    mosquitto, fleet, tmp_path
):
    """Clock set back a day, state directory new: a job that expired 23 hours ago in real time
    is refused as expired, because the held policy's issue time is the floor."""
    vid = "veh-fresh"
    files = write_vehicle(tmp_path, vid, port=mosquitto.port, fleet=fleet)
    day = 86_400.0
    agent_ = build_agent(load_config(files.config_path), clock=lambda: time.time() - day)
    stop = asyncio.Event()
    async with observing(mosquitto.port, vid) as obs:
        task = asyncio.create_task(agent_.run(stop))
        try:
            await wait_for(lambda: agent_.status()["connected"], what="connected")
            stale = job_spec(fleet, vid, issued_at=time.time() - day - 3600, lifetime_s=7200)
            await obs.send_job(signed(stale, fleet.job_key))
            await wait_for(lambda: "rejected" in obs.kinds(), what="rejected")
            assert _reasons(obs, "rejected") == ["expired"]
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)


# ---- a worker killed from outside ------------------------------------------------------


def _worker_pid() -> int | None:
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "agent.inference.worker" in " ".join(child.cmdline()):
                return child.pid
    return None


async def test_a_worker_killed_from_outside_hands_the_job_back_without_a_strike(
    mosquitto, fleet, tmp_path
):
    """SIGKILL from outside (as the OOM killer would), three times under the same job: each
    attempt is released as worker_killed, never failed or poisoned, and the fourth runs."""
    vid = "veh-killed"
    files = write_vehicle(tmp_path, vid, port=mosquitto.port, fleet=fleet)
    async with observing(mosquitto.port, vid) as obs, running_agent(files):
        for attempt in (1, 2, 3):
            warm = f"warm-{attempt}"  # a started worker, so the kill lands mid-job
            await obs.send_job(signed(burn_spec(fleet, vid, rows=10, job_id=warm), fleet.job_key))
            await wait_for(lambda w=warm: "succeeded" in obs.kinds(w), what="worker warm")
            spec = burn_spec(fleet, vid, rows=400_000, attempt=attempt)
            await obs.send_job(signed(spec, fleet.job_key))
            await wait_for(lambda a=attempt: obs.kinds().count("running") == a, what="running")
            await wait_for(lambda: _worker_pid() is not None, what="a worker")
            cpu0 = psutil.Process(_worker_pid()).cpu_times().user
            await wait_for(
                lambda c=cpu0: psutil.Process(_worker_pid()).cpu_times().user > c + 0.05,
                what="computing",
            )
            os.kill(_worker_pid(), signal.SIGKILL)
            await wait_for(lambda a=attempt: obs.kinds().count("released") == a, what="released")
        assert _reasons(obs, "released") == ["worker_killed"] * 3
        assert "failed" not in obs.kinds() and "rejected" not in obs.kinds()
        await obs.send_job(signed(burn_spec(fleet, vid, rows=10, attempt=4), fleet.job_key))
        await wait_for(lambda: "succeeded" in obs.kinds(), what="fourth attempt ran")


# ---- a full state disk -----------------------------------------------------------------


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        pytest.skip("no mount command here")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run([umount, "-l", str(path)], check=False)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with filler.open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(bytes(64 * 1024))
            f.flush()
    return filler


async def test_a_full_state_disk_closes_the_gate_and_work_resumes_when_space_returns(
    mosquitto, fleet, tmp_path
):
    """State on an 8 MiB tmpfs, filled: the next job is handed back (not run, not lost), the
    gate closes with state_disk_unavailable in status and no work is asked for; with space
    back the gate reopens by itself and jobs run. The daemon never exits."""
    vid = "veh-disk"
    files = write_vehicle(tmp_path, vid, port=mosquitto.port, fleet=fleet)
    with _small_tmpfs(files.config_path.parent / "state", "8m") as state:
        async with observing(mosquitto.port, vid) as obs, running_agent(files) as agent_:
            await _serves_next(obs, fleet, vid, "before")
            filler = _fill(state)
            await obs.send_job(signed(job_spec(fleet, vid), fleet.job_key))
            await wait_for(lambda: "released" in obs.kinds(), timeout=20, what="handed back")
            assert _reasons(obs, "released") == ["state_disk_unavailable"]
            status = agent_.status()
            assert not status["gate"]["open"]
            assert "state_disk_unavailable" in status["gate"]["reasons"]
            asked = len(obs.work)
            await asyncio.sleep(1.0)
            assert len(obs.work) == asked, "no work asked for while the disk is full"
            filler.unlink()
            await wait_for(lambda: agent_.status()["gate"]["open"], timeout=10, what="reopened")
            await _serves_next(obs, fleet, vid, "after")
    assert "state_disk_unavailable" not in agent_.status()["gate"]["reasons"]


# ---- energy per job --------------------------------------------------------------------


async def test_each_jobs_energy_is_booked_and_the_jobs_sum_to_the_day(mosquitto, fleet, tmp_path):
    """Jobs of different lengths, back to back and after idle gaps: each job's ledger row is at
    least its run time at the module's idle power (nothing of its head or tail goes missing),
    and the rows sum to the day's row exactly."""
    vid = "veh-energy"
    files = write_vehicle(tmp_path, vid, port=mosquitto.port, fleet=fleet)
    sizes = [20_000, 5_000, 40_000, 2_000, 30_000]
    async with observing(mosquitto.port, vid) as obs, running_agent(files) as agent_:
        for i, rows in enumerate(sizes):
            await obs.send_job(
                signed(burn_spec(fleet, vid, rows=rows, job_id=f"e{i}"), fleet.job_key)
            )
            if i % 2:
                await wait_for(lambda j=i: "succeeded" in obs.kinds(f"e{j}"), what="done")
                await asyncio.sleep(0.35)  # an idle gap before the next
        await wait_for(lambda: len(obs.results) == len(sizes), timeout=30, what="all results")
        day = agent_.status()["energy"]["day"]
    ledger = EnergyLedger(files.config_path.parent / "state" / "state.db")
    rows = {f"e{i}": ledger.job_wh(f"e{i}", 1) for i in range(len(sizes))}
    day_wh = ledger.day_total(day)
    ledger.close()
    assert all(r is not None and r > 0 for r in rows.values()), rows
    assert math.fsum(rows.values()) == pytest.approx(day_wh, rel=1e-9, abs=1e-12)
    idle_w = 4.0  # the parked-charging car's compute module at rest draws at least this
    for raw in obs.results:
        body = _open_result(raw, files, fleet)
        assert body.energy_wh == pytest.approx(rows[body.job_id], rel=1e-9)
        # Booked from before its compute started to after it ended: never less than idle
        # power over the run time the result itself reports.
        assert body.energy_wh * 3600.0 >= idle_w * body.runtime_ms / 1000.0, body.job_id


def _open_result(raw: bytes, files, fleet):
    from agent.wire.bundle import decode_result_body, verify_result
    from agent.wire.keys import KeyRing
    from agent.wire.sealing import open_sealed, result_info

    sealed, _ = verify_result(raw, trusted=KeyRing.of(files.key.public_key()), max_bytes=1 << 22)
    info = result_info(sealed.job_id, sealed.attempt, sealed.vehicle_id, sealed.job_digest)
    return decode_result_body(open_sealed(sealed.ciphertext, fleet.requester, info))


async def test_an_agent_started_on_a_full_state_disk_starts_with_its_gate_closed(
    mosquitto, fleet, tmp_path
):
    """Restarted with its state disk full: the agent starts (no crash loop), its gate is
    closed with state_disk_unavailable before any job arrives, and opens once space returns."""
    vid = "veh-full-start"
    files = write_vehicle(tmp_path, vid, port=mosquitto.port, fleet=fleet)
    with _small_tmpfs(files.config_path.parent / "state", "8m") as state:
        async with running_agent(files):
            pass  # the state database exists now, as on a car that ran before
        filler = _fill(state)
        async with running_agent(files) as agent_:
            await wait_for(lambda: agent_.status()["gate"]["reasons"] != ["starting"], what="gate")
            assert "state_disk_unavailable" in agent_.status()["gate"]["reasons"]
            filler.unlink()
            await wait_for(lambda: agent_.status()["gate"]["open"], timeout=10, what="reopened")
