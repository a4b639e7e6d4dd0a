"""THREATS.md 19-22 against the real agent and broker over mutual TLS: the car changing state
mid-job, the owner's opt-in and opt-out, bad configs (at start and on reload), and the daily
energy allowance."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

import pytest

from agent.config import load_config
from tests.adversarial.conftest import VID, Rig
from tests.support import burn_spec, job_spec, refused_at_start, signed, wait_for

pytestmark = pytest.mark.broker


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"gear": "D"}, "not_parked"),
        ({"plugged_in": False}, "unplugged"),
        ({"charging": False}, "not_charging"),
        ({"compute_temp_c": 95.0}, "compute_too_hot"),
        ({"battery_temp_c": 60.0}, "battery_too_hot"),
    ],
    ids=["leaves-park", "unplugged", "stops-charging", "compute-hot", "battery-hot"],
)
async def test_the_car_changing_mid_job_stops_compute_and_hands_the_job_back(
    rig: Rig, change, reason
):
    """Compute stops at once, the job is reported preempted with the reason and handed back, no
    result is published, and nothing more is asked for while the gate is closed."""
    fleet = rig.fleet
    files = rig.vehicle()
    async with rig.serving(files) as (obs, agent):
        await obs.send_job(signed(burn_spec(fleet, VID, rows=500_000), fleet.job_key))
        await wait_for(lambda: (agent.status()["worker"]["cpu_s"] or 0) > 0.1, what="worker busy")
        agent.set_vehicle(change)
        await wait_for(lambda: "preempted" in obs.kinds(), what="preempted")
        preempted = next(e for e in obs.events if e["kind"] == "preempted")
        assert reason in preempted["reason"]
        cpu = agent.status()["worker"]["cpu_s"]
        await asyncio.sleep(0.2)
        assert cpu is None or agent.status()["worker"]["cpu_s"] in (None, cpu), "compute stopped"
        requests = len(obs.work)
        await asyncio.sleep(1.0)
        assert obs.results == []
        assert len(obs.work) == requests, "nothing asked for while the gate is closed"
        assert agent.status()["current_job"] is None


async def test_an_owner_who_has_not_opted_in_lends_nothing(rig: Rig):
    fleet = rig.fleet
    files = rig.vehicle(opted_in=False)
    async with rig.serving(files) as (obs, agent):
        await obs.send_job(signed(job_spec(fleet, VID), fleet.job_key))
        await wait_for(lambda: "released" in obs.kinds(), what="handed back")
        assert [e["reason"] for e in obs.events if e["kind"] == "released"] == ["gate_closed"]
        assert "not_opted_in" in agent.status()["gate"]["reasons"]
        assert agent.counts["running"] == 0 and obs.results == [] and obs.work == []


async def test_opting_out_mid_job_stops_it_at_once(rig: Rig):
    """A reloaded config with opted_in = false preempts the running job (not_opted_in)."""
    fleet = rig.fleet
    files = rig.vehicle()
    async with rig.serving(files) as (obs, agent):
        await obs.send_job(signed(burn_spec(fleet, VID, rows=500_000), fleet.job_key))
        await wait_for(lambda: (agent.status()["worker"]["cpu_s"] or 0) > 0.1, what="worker busy")
        files.config_path.write_text(
            files.config_path.read_text().replace("opted_in = true", "opted_in = false")
        )
        agent.reload(load_config(files.config_path))
        await wait_for(lambda: "preempted" in obs.kinds(), what="preempted")
        assert "not_opted_in" in next(e for e in obs.events if e["kind"] == "preempted")["reason"]
        await asyncio.sleep(0.3)
        assert obs.results == []


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t: t + "\n[owner.extra]\nx = 1\n", "owner.extra"),
        (lambda t: t.replace("gate_hold_s = 0.0", "gate_hold_s = -5"), "gate_hold_s"),
        (lambda t: t.replace("[owner]", "[owner"), "not valid TOML"),
        (lambda t: t.replace("opted_in = true", 'opted_in = "yes"'), "opted_in"),
    ],
    ids=["unknown-key", "impossible-value", "malformed", "wrong-type"],
)
def test_a_bad_config_stops_the_agent_at_start_saying_where(rig: Rig, edit, needle):
    """Exit 78 (no restart by systemd) and the key or line that is wrong; nothing connects."""
    files = rig.vehicle()
    files.config_path.write_text(edit(files.config_path.read_text()))
    printed = refused_at_start(files.config_path)
    assert needle in printed


async def test_a_bad_reload_keeps_the_last_good_config_and_the_agent_serving(rig: Rig):
    """A SIGHUP with a broken file is refused (logged with the problem) and the process keeps
    serving jobs over TLS."""
    fleet = rig.fleet
    files = rig.vehicle()
    good = files.config_path.read_text()
    async with rig.observe() as obs:
        proc = subprocess.Popen(  # noqa: ASYNC220 - starting it is instant
            [sys.executable, "-m", "agent.cli", "run", "--config", str(files.config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            await wait_for(lambda: obs.work, timeout=20, what="asking for work")
            files.config_path.write_text(good + "\n[nonsense]\n")
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            assert proc.poll() is None
            await obs.send_job(signed(job_spec(fleet, VID), fleet.job_key))
            await wait_for(lambda: "succeeded" in obs.kinds(), timeout=20, what="still serving")
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 15)
    assert proc.stdout is not None
    with proc.stdout:
        lines = [json.loads(line) for line in proc.stdout.read().decode().splitlines() if line]
    refused = [x for x in lines if x.get("event") == "config_reload_refused"]
    assert refused and "nonsense" in json.dumps(refused[0]["problems"])


async def test_a_spent_daily_allowance_lends_nothing_more(rig: Rig):
    """After the allowance is used the gate closes (daily_energy_spent): a job sent anyway is
    handed back and nothing runs."""
    fleet = rig.fleet
    files = rig.vehicle(limits="daily_energy_wh = 0.0005")
    async with rig.serving(files) as (obs, agent):
        await obs.send_job(signed(burn_spec(fleet, VID, rows=5_000), fleet.job_key))
        await wait_for(
            lambda: "daily_energy_spent" in agent.status()["gate"]["reasons"],
            timeout=20,
            what="allowance spent",
        )
        await wait_for(lambda: "succeeded" in obs.kinds() or "preempted" in obs.kinds(), what="end")
        ran = agent.counts["running"]
        await obs.send_job(signed(job_spec(fleet, VID, job_id="job-2"), fleet.job_key))
        await wait_for(lambda: "released" in obs.kinds("job-2"), what="handed back")
        assert agent.counts["running"] == ran
