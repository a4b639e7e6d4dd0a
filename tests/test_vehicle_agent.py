"""The agent on the emulated car: scenarios, preemption on unplug, energy, owner choices, live control."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import aiomqtt
import pytest

from agent.cli import main as agent_cli
from agent.runtime.control import request
from agent.state.ledger import EnergyLedger
from agent.wire.bundle import decode_result_body, verify_result
from agent.wire.keys import KeyRing
from agent.wire.messages import ResultBody
from agent.wire.sealing import open_sealed, result_info
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


def _open_result(raw: bytes, files, fleet, raw_job: bytes) -> ResultBody:
    sealed, _ = verify_result(raw, trusted=KeyRing.of(files.key.public_key()), max_bytes=1 << 22)
    info = result_info(sealed.job_id, sealed.attempt, sealed.vehicle_id, sealed.job_digest)
    return decode_result_body(open_sealed(sealed.ciphertext, fleet.requester, info))


async def test_unplugged_mid_job_preempts_and_stops_asking_for_work(mosquitto, fleet, tmp_path):
    """A scenario unplugs the car while a job runs: the job is preempted and handed back with the
    reason, no result is published, the status says why, and no work is asked for after."""
    scenario = tmp_path / "unplug.toml"
    scenario.write_text(
        'description = "unplugged 5 s in"\n[initial]\ngear = "P"\nplugged_in = true\n'
        "charging = true\n[[events]]\nat_s = 5.0\nplugged_in = false\n"
        '[[events]]\nat_s = 5.5\ngear = "D"\n'
    )
    files = write_vehicle(
        tmp_path, "veh-unplug", port=mosquitto.port, fleet=fleet, scenario_path=scenario
    )
    async with observing(mosquitto.port, "veh-unplug") as obs, running_agent(files) as agent:
        await wait_for(lambda: obs.work, what="a work request while eligible")
        await obs.send_job(signed(burn_spec(fleet, "veh-unplug", rows=200_000), fleet.job_key))
        await wait_for(lambda: "running" in obs.kinds(), what="job running")
        await wait_for(lambda: "preempted" in obs.kinds(), timeout=10, what="preempted")
        unplugged_at = time.time()
        preempted = next(e for e in obs.events if e["kind"] == "preempted")
        assert "unplugged" in preempted["reason"] and "not_charging" in preempted["reason"]
        await asyncio.sleep(1.0)  # > three work-request intervals
        assert obs.results == []
        assert not [w for w in obs.work if w["sent_at"] > unplugged_at - 0.05]
        # The drive-off at 5.5 s is seen at the next poll (1 s while the gate is closed).
        await wait_for(
            lambda: (
                {"unplugged", "not_charging", "not_parked"}
                <= {r.value for r in agent.gate.last.reasons}
            ),
            what="status says why",
        )
        assert not agent.gate.is_open
        assert agent.status()["gate"]["open"] is False


async def test_result_reports_the_energy_the_job_used_and_the_ledger_keeps_it(
    mosquitto, fleet, tmp_path
):
    """The sealed result carries the job's energy (compute power x time) and the ledger persists it."""
    files = write_vehicle(tmp_path, "veh-energy", port=mosquitto.port, fleet=fleet)
    raw_job = signed(burn_spec(fleet, "veh-energy", rows=10_000), fleet.job_key)
    async with observing(mosquitto.port, "veh-energy") as obs, running_agent(files) as agent:
        await obs.send_job(raw_job)
        await wait_for(lambda: obs.results, timeout=20, what="result")
        today = agent.energy.day
        today_wh = agent.energy.today_wh
    body = _open_result(obs.results[0], files, fleet, raw_job)
    assert body.energy_wh is not None and body.energy_wh > 0
    # The emulated module draws between its idle 4 W and its full 30 W while a job runs
    # (the default 15 W cap holds it near 15 W once the governor has its measure).
    hours = body.runtime_ms / 1000 / 3600
    assert 4.0 * hours * 0.5 <= body.energy_wh <= 30.0 * hours * 1.1
    ledger = EnergyLedger(files.config_path.parent / "state" / "state.db")
    assert ledger.job_wh("job-1", 1) == pytest.approx(body.energy_wh)
    assert ledger.day_total(today) == pytest.approx(today_wh)


async def test_daily_allowance_closes_the_gate_and_survives_restart(mosquitto, fleet, tmp_path):
    """Once the day's allowance is spent the gate closes; a restarted agent remembers it."""
    files = write_vehicle(
        tmp_path, "veh-allow", port=mosquitto.port, fleet=fleet, limits="daily_energy_wh = 0.0005"
    )
    async with observing(mosquitto.port, "veh-allow") as obs, running_agent(files) as agent:
        await obs.send_job(signed(burn_spec(fleet, "veh-allow", rows=5_000), fleet.job_key))
        await wait_for(
            lambda: "daily_energy_spent" in agent.status()["gate"]["reasons"],
            timeout=20,
            what="allowance spent",
        )
        requests_then = len(obs.work)
        await asyncio.sleep(1.0)
        assert len(obs.work) == requests_then, "no work asked for once the allowance is spent"
    async with running_agent(files) as again:
        await wait_for(lambda: again.gate.last is not None, what="first gate decision")
        assert "daily_energy_spent" in again.status()["gate"]["reasons"]


@pytest.mark.parametrize(
    ("owner", "override", "reason"),
    [
        ('accepted_job_classes = ["weather"]\n', {}, "class_not_accepted"),
        ('accepted_issuers = ["0123456789abcdef"]\n', {}, "issuer_not_accepted"),
    ],
)
async def test_owner_refuses_issuers_and_classes_it_did_not_accept(
    mosquitto, fleet, tmp_path, owner, override, reason
):
    """A validly signed job of a class or issuer the owner did not accept is rejected and not run."""
    files = write_vehicle(tmp_path, "veh-owner", port=mosquitto.port, fleet=fleet, owner=owner)
    async with observing(mosquitto.port, "veh-owner") as obs, running_agent(files) as agent:
        await obs.send_job(signed(job_spec(fleet, "veh-owner", **override), fleet.job_key))
        await wait_for(lambda: "rejected" in obs.kinds(), what="rejected")
        assert [e["reason"] for e in obs.events if e["kind"] == "rejected"] == [reason]
        assert agent.counts["running"] == 0


async def test_outside_allowed_hours_nothing_is_asked_for(mosquitto, fleet, tmp_path):
    """With no allowed hours today, the gate stays closed with outside_allowed_hours."""
    days = "".join(f"{d} = []\n" for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun"))
    files = write_vehicle(
        tmp_path, "veh-hours", port=mosquitto.port, fleet=fleet, owner=f"[owner.hours]\n{days}"
    )
    async with observing(mosquitto.port, "veh-hours") as obs, running_agent(files) as agent:
        await asyncio.sleep(0.7)
        assert obs.work == []
        assert agent.status()["gate"]["reasons"] == ["outside_allowed_hours"]


async def test_live_control_socket_unplugs_the_car_and_status_says_why(
    mosquitto, fleet, tmp_path, capsys
):
    """`edge-agent vehicle set` over the control socket changes the car; `status` shows the reasons."""
    files = write_vehicle(tmp_path, "veh-ctl", port=mosquitto.port, fleet=fleet)
    sock = files.config_path.parent / "state" / "control.sock"
    async with running_agent(files) as agent:
        await wait_for(lambda: agent.gate.is_open, what="gate open")
        await wait_for(sock.exists, what="control socket")
        assert (sock.stat().st_mode & 0o777) == 0o600
        rc = await asyncio.to_thread(
            agent_cli, ["vehicle", "set", "--socket", str(sock), "plugged_in=false"]
        )
        assert rc == 0
        assert not agent.gate.is_open
        reply = await asyncio.to_thread(request, sock, {"op": "status"})
        assert reply["ok"] and {"unplugged", "not_charging"} <= set(
            reply["status"]["gate"]["reasons"]
        )
        bad = await asyncio.to_thread(request, sock, {"op": "set", "fields": {"gear": "X"}})
        assert bad["ok"] is False and "gear" in bad["error"]
        odd = await asyncio.to_thread(request, sock, {"op": "reboot"})
        assert odd == {"ok": False, "error": "unknown op 'reboot'; use 'status' or 'set'"}
        rc = await asyncio.to_thread(agent_cli, ["vehicle", "set", "--socket", str(sock), "gear"])
        assert rc == 2
        rc = await asyncio.to_thread(agent_cli, ["status", "--socket", str(sock)])
        assert rc == 0
        shown = capsys.readouterr().out
        assert "because: unplugged, not_charging" in shown
        assert "queued    0, outbox 0" in shown
        assert "worker    none (started with the first job)" in shown
        assert "models    burn, digits; trust policy v1" in shown
        assert agent.counts["running"] == 0


def test_status_without_a_running_agent_says_so(tmp_path, capsys):
    """`edge-agent status` with no agent behind the socket explains, and exits non-zero."""
    rc = agent_cli(["status", "--socket", str(tmp_path / "none.sock")])
    assert rc != 0
    assert "is the agent running?" in capsys.readouterr().err


async def test_sighup_reloads_config_and_a_bad_reload_keeps_the_last_good(
    mosquitto, fleet, tmp_path
):
    """SIGHUP applies an opt-out at once; a broken file is refused and the agent keeps serving."""
    files = write_vehicle(tmp_path, "veh-hup", port=mosquitto.port, fleet=fleet)
    good = files.config_path.read_text()
    statuses: list[dict] = []
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.subscribe("fleet/v1/vehicles/veh-hup/status", qos=1)

        async def pump() -> None:
            async for m in client.messages:
                if isinstance(m.payload, bytes) and m.payload:
                    statuses.append(json.loads(m.payload))

        pumper = asyncio.create_task(pump())
        proc = subprocess.Popen(  # noqa: ASYNC220 - starting it is instant
            [sys.executable, "-m", "agent.cli", "run", "--config", str(files.config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            await wait_for(lambda: statuses and statuses[-1]["gate_open"], timeout=20, what="open")
            files.config_path.write_text(good.replace("opted_in = true", "opted_in = false"))
            proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: "not_opted_in" in statuses[-1]["reasons"], what="opted out")
            files.config_path.write_text(good + "\n[nonsense]\n")
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.7)
            assert proc.poll() is None, "a bad reload must not stop the agent"
            assert "not_opted_in" in statuses[-1]["reasons"], "last good config still in force"
            files.config_path.write_text(good)
            proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: statuses[-1]["gate_open"], what="opted in again")
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 15)
        finally:
            if proc.poll() is None:
                proc.kill()
            pumper.cancel()
    assert proc.stdout is not None
    with proc.stdout:
        out = proc.stdout.read().decode()
    assert '"event": "config_reload_refused"' in out
    assert "nonsense" in out
