"""The agent and the demo as real processes: clean shutdown on SIGTERM, the demo's own checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from agent.kit.exitcodes import ExitCode
from broker.demo import run_demo
from tests.support import refused_at_start, wait_for, write_vehicle

pytestmark = pytest.mark.broker


@contextlib.asynccontextmanager
async def _statuses(port: int, vehicle_id: str) -> AsyncIterator[list[dict]]:
    """Every non-empty status `vehicle_id` publishes while inside, parsed, in order."""
    statuses: list[dict] = []
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(f"fleet/v1/vehicles/{vehicle_id}/status", qos=1)

        async def pump() -> None:
            async for m in client.messages:
                if isinstance(m.payload, bytes) and m.payload:
                    statuses.append(json.loads(m.payload))

        pumper = asyncio.create_task(pump())
        try:
            yield statuses
        finally:
            pumper.cancel()


def _agent(config: Path, out: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        stdout=out,
        stderr=subprocess.STDOUT,
    )


async def test_sigterm_stops_the_agent_cleanly_and_says_offline(mosquitto, fleet, tmp_path):
    """SIGTERM ends `edge-agent run` with exit 0 after it publishes a retained offline status."""
    files = write_vehicle(tmp_path, "veh-proc", port=mosquitto.port, fleet=fleet)
    async with _statuses(mosquitto.port, "veh-proc") as statuses:
        proc = _agent(files.config_path, subprocess.PIPE)
        try:
            await wait_for(lambda: any(s["online"] for s in statuses), timeout=20, what="online")
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(proc.wait, 15)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.stdout is not None
    with proc.stdout:
        out = proc.stdout.read().decode()
    assert rc == ExitCode.OK, out
    await wait_for(lambda: not statuses[-1]["online"], what="offline status")
    assert statuses[-1]["reasons"] != ["connection_lost"], "clean stop, not the Last Will"
    assert '"event": "agent_stopped"' in out


async def test_sigkill_leaves_a_last_will_that_says_nothing_stale(mosquitto, fleet, tmp_path):
    """An agent killed outright is reported offline by the broker's copy of its Last Will,
    which names no policy version (fixed at connect, it would go stale after a rollout)."""
    files = write_vehicle(tmp_path, "veh-will", port=mosquitto.port, fleet=fleet)
    async with _statuses(mosquitto.port, "veh-will") as statuses:
        proc = _agent(files.config_path, subprocess.DEVNULL)
        try:
            await wait_for(lambda: any(s["online"] for s in statuses), timeout=20, what="online")
            assert statuses[-1]["policy_version"] == 1, "the live status names the policy"
            proc.kill()
            await asyncio.to_thread(proc.wait, 15)
            await wait_for(lambda: not statuses[-1]["online"], timeout=10, what="the Last Will")
        finally:
            if proc.poll() is None:
                proc.kill()
    assert statuses[-1]["reasons"] == ["connection_lost"]
    assert statuses[-1]["policy_version"] is None


def test_agent_with_bad_config_exits_with_config_code(tmp_path):
    """`edge-agent run` on a bad config exits 78 (EX_CONFIG) so systemd does not restart-loop."""
    bad = tmp_path / "agent.toml"
    bad.write_text("[vehicle]\nid = 'x'\nwings = 2\n")
    printed = refused_at_start(bad)
    assert "vehicle.wings" in printed


def test_agent_with_missing_key_exits_with_config_code(tmp_path, fleet, mosquitto):
    """A config whose key file is missing is refused at start with the path named."""
    files = write_vehicle(tmp_path, "veh-nokey", port=mosquitto.port, fleet=fleet)
    (files.config_path.parent / "vehicle.key").unlink()
    printed = refused_at_start(files.config_path)
    assert "vehicle.key" in printed


def test_demo_runs_end_to_end(tmp_path):
    """The demo, small: every job verified and decrypted, all by the eligible car, predictions right."""
    report = run_demo(tmp_path / "demo", jobs=40, timeout_s=40)
    assert report["ok"], report
    assert report["results_verified_and_decrypted"] == 40
    assert report["agreement_with_local_onnxruntime"] == 1.0
    assert report["per_vehicle"]["car-driving"]["jobs_received"] == 0
    assert report["per_vehicle"]["car-hot"]["jobs_received"] == 0
    assert report["accuracy"] >= 0.9


@pytest.mark.parametrize(
    ("target", "mode", "needle"),
    [
        ("agent.toml", 0o666, "the config"),
        ("vehicle.key", 0o644, "readable by group or others"),
        ("vehicle.key", 0o620, "writable by group or others"),
        ("trust-policy.json", 0o646, "the trust anchor"),
    ],
)
def test_agent_refuses_files_others_could_change(tmp_path, fleet, mosquitto, target, mode, needle):
    """A config or trusted-keys file others can write, or a key others can read, stops the agent at
    start with exit 78 and the chmod that fixes it."""
    files = write_vehicle(tmp_path, "veh-perm", port=mosquitto.port, fleet=fleet)
    (files.config_path.parent / target).chmod(mode)
    printed = refused_at_start(files.config_path)
    assert needle in printed and "chmod" in printed
