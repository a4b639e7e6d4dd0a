"""`make interop`: the project against a second MQTT implementation, ejabberd's mod_mqtt
(Debian 12: ejabberd 23.01, partial MQTT 5, no shared subscriptions), as a new user would
run it: the demo with `--host/--port` and a login, then `edge-fleet serve` and `edge-agent
run` as processes, the Last Will, a retained policy update, a wrong password, and a
message larger than the car accepts. docs/scale.md records what works there and what cannot.

ejabberd authenticates by user name and password (no client certificates on this listener),
so everything here logs in: the fleet as `fleet`, the car as `car-1`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from agent.kit.keyfiles import write_private_key
from agent.wire.keys import raw_public
from agent.wire.topics import POLICY_TOPIC, Channel, topic
from tests.interop.ejabberd import LocalEjabberd
from tests.support import FleetKeys, running_agent, wait_for, write_vehicle

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

FLEET_PASSWORD = "fleet-pw-0"
CAR_PASSWORD = "car-pw-1"


@pytest.fixture(scope="module")
def ejabberd() -> Iterator[LocalEjabberd]:
    # Not under pytest's tmp folder: that is private to root, and ejabberd runs as its own user.
    workdir = Path(tempfile.mkdtemp(prefix="edge-ejabberd-"))
    with LocalEjabberd(workdir, users={"fleet": FLEET_PASSWORD, "car-1": CAR_PASSWORD}) as b:
        yield b
    shutil.rmtree(workdir, ignore_errors=True)


def _secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _car(tmp_path: Path, fleet: FleetKeys, port: int, password: str, **kw: object):
    files = write_vehicle(tmp_path, "car-1", port=port, fleet=fleet, **kw)  # type: ignore[arg-type]
    secret = _secret(files.config_path.parent / "broker-password", password)
    text = files.config_path.read_text().replace(
        "[broker]\n", f'[broker]\nusername = "car-1"\npassword_file = "{secret.name}"\n', 1
    )
    files.config_path.write_text(text)
    return files


def test_the_demo_runs_on_ejabberd_with_a_login(ejabberd: LocalEjabberd, tmp_path: Path) -> None:
    """100 of 100 results verified and decrypted, only the eligible car ran jobs, and the
    retained policy v2 reached every car (the report's `ok` checks all three)."""
    password = _secret(tmp_path / "fleet-password", FLEET_PASSWORD)
    out = _run(
        "broker.cli", "demo",
        "--host", "127.0.0.1", "--port", str(ejabberd.port),
        "--username", "fleet", "--password-file", str(password),
        "--jobs", "100",
        "--workdir", str(tmp_path / "demo"), "--report", str(tmp_path / "report.json"),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is True
    assert report["results_verified_and_decrypted"] == 100
    assert report["broker"] == f"127.0.0.1:{ejabberd.port}"
    assert all(v["trust_policy_version"] == 2 for v in report["per_vehicle"].values())
    assert "shared_subscriptions_unavailable" in out.stdout + out.stderr


def test_serve_and_an_agent_on_ejabberd(
    ejabberd: LocalEjabberd, fleet: FleetKeys, tmp_path: Path
) -> None:
    """The operator's path: register, submit, `edge-fleet serve` and `edge-agent run`, each
    with its own login. Then a retained policy update reaches the car, and a `kill -9` of the
    agent leaves its Last Will (offline, connection_lost) for `edge-fleet vehicles`."""
    asyncio.run(_clear_retained_policy(ejabberd.port))  # the demo's, signed by another root
    files = _car(tmp_path, fleet, ejabberd.port, CAR_PASSWORD)
    write_private_key(tmp_path / "job.key", fleet.job_key)
    write_private_key(tmp_path / "requester.key", fleet.requester)
    fleet_pw = _secret(tmp_path / "fleet-password", FLEET_PASSWORD)
    login = ["--port", str(ejabberd.port), "--username", "fleet", "--password-file", str(fleet_pw)]
    public = base64.b64encode(raw_public(files.key.public_key())).decode()
    registry, queue = str(tmp_path / "vehicles.json"), str(tmp_path / "queue.db")
    done = _run(
        "broker.cli", "register", "--registry", registry, "--vehicle-id", "car-1",
        "--public-key", public,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = _run(
        "broker.cli", "submit", "--queue", queue, "--count", "100",
        "--requester-key", str(tmp_path / "requester.key"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    serve_log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen(
        [
            sys.executable, "-m", "broker.cli", "serve", "--queue", queue,
            "--job-key", str(tmp_path / "job.key"),
            "--requester-key", str(tmp_path / "requester.key"),
            "--registry", registry, *login,
        ],
        stdout=serve_log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    agent_log = (tmp_path / "agent.log").open("w")
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(files.config_path)],
        stdout=agent_log,
        stderr=subprocess.STDOUT,
    )
    try:
        jobs = _run("broker.cli", "jobs", "--queue", queue, "--wait-done", "120", timeout=150)
        counts = json.loads(jobs.stdout)
        assert counts.get("done") == 100, jobs.stdout + (tmp_path / "agent.log").read_text()

        (tmp_path / "policy-v2.json").write_bytes(fleet.policy(version=2))
        published = _run(
            "broker.cli", "policy", "publish", "--policy", str(tmp_path / "policy-v2.json"),
            *login,
        )  # fmt: skip
        assert published.returncode == 0, published.stderr
        assert _vehicle(login, lambda car: car.get("policy_version") == 2), "policy v2 taken"

        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        will = _vehicle(login, lambda car: car.get("connected") is False)
        assert will is not None, "the Last Will arrived"
        assert will["reasons"] == ["connection_lost"] and will["policy_version"] is None
    finally:
        if agent.poll() is None:
            agent.kill()
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
        serve_log.close()
        agent_log.close()
    summary = json.loads((tmp_path / "serve.log").read_text().strip().splitlines()[-1])
    assert summary["results"] == 100 and not summary["rejected"], summary
    assert "shared_subscriptions_unavailable" in (tmp_path / "serve.log").read_text()


async def _clear_retained_policy(port: int) -> None:
    async with _fleet_client(port) as client:
        await client.publish(POLICY_TOPIC, b"", qos=1, retain=True)


def _fleet_client(port: int) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        username="fleet",
        password=FLEET_PASSWORD,
        identifier=f"fleet-test-{os.getpid()}-{time.time_ns()}",
        protocol=aiomqtt.ProtocolVersion.V5,
    )


def _vehicle(login: list[str], wanted, timeout_s: float = 20.0) -> dict | None:
    """car-1 as `edge-fleet vehicles` shows it, once `wanted` holds (None if it never did)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = _run("broker.cli", "vehicles", *login, "--json", "--wait", "1")
        if out.returncode == 0:
            car = json.loads(out.stdout)["vehicles"].get("car-1", {})
            if wanted(car):
                return car
        time.sleep(0.5)
    return None


def test_a_wrong_password_on_ejabberd_is_told_as_a_refusal(
    ejabberd: LocalEjabberd, fleet: FleetKeys, tmp_path: Path
) -> None:
    files = _car(tmp_path, fleet, ejabberd.port, "not-the-password")
    out = _run("agent.cli", "doctor", "--config", str(files.config_path))
    assert "refused by the broker: not authorized" in out.stdout, out.stdout + out.stderr
    bad = _secret(tmp_path / "bad", "nope")
    out = _run(
        "broker.cli", "vehicles", "--port", str(ejabberd.port),
        "--username", "fleet", "--password-file", str(bad), "--wait", "0.5",
    )  # fmt: skip
    assert out.returncode != 0 and "refused by the broker: not authorized" in out.stderr


async def test_ejabberd_forwards_what_the_car_refused_and_the_agents_guard_holds(
    ejabberd: LocalEjabberd, fleet: FleetKeys, tmp_path: Path
) -> None:
    """The car announces a 1 MiB Maximum Packet Size; ejabberd forwards a 2 MiB message
    anyway. The agent hangs up before reading it, is counted and logged, reconnects, and
    parses nothing."""
    files = _car(tmp_path, fleet, ejabberd.port, CAR_PASSWORD)
    async with running_agent(files) as agent:
        async with _fleet_client(ejabberd.port) as client:
            await client.publish(topic("car-1", Channel.JOBS), b"{" + b" " * 2**21 + b"}", qos=1)
        await wait_for(lambda: agent.counts["oversized_packets"] >= 1, what="guard", timeout=20)
        await wait_for(lambda: agent.status()["connected"], what="reconnected", timeout=60)
        assert agent.counts["rejected"] == 0
        await asyncio.sleep(0)
