"""Brokers that want a login: user name and password (or token) from a file or a systemd
credential for the agent and every fleet tool, and a refusal told as such, not as an outage.

The broker here is a real Mosquitto with a password file and no anonymous clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.assembly import build_agent
from agent.config import ConfigError, load_config
from agent.doctor import broker as doctor_broker
from agent.kit.backoff import ReconnectBackoff
from agent.kit.credentials import (
    MAX_SECRET_BYTES,
    BrokerLogin,
    CredentialError,
    credential_path,
    load_login,
    read_secret,
)
from agent.kit.exitcodes import ExitCode
from agent.kit.mqtt import permanent_refusal
from broker.collector import Collector
from broker.fleet import FleetNode
from broker.local import LocalMosquitto, free_port
from broker.store.sqlite import JobQueue, SqliteStore
from tests.support import refused_at_start, running_agent, wait_for, write_vehicle
from tests.test_fleet import template

CAR_PASSWORD = "car-s3cret"
FLEET_PASSWORD = "fleet-s3cret"


def _secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# ---- the pure parts -------------------------------------------------------------------


def test_a_password_file_is_one_private_line(tmp_path):
    assert read_secret(_secret(tmp_path / "ok", "s3cret\n")) == "s3cret"
    assert read_secret(_secret(tmp_path / "crlf", "s3cret\r\n")) == "s3cret"
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    (tmp_path / "bin").chmod(0o600)
    (tmp_path / "dir").mkdir()
    wrong = {
        "missing": (tmp_path / "nope", "No such file"),
        "empty": (_secret(tmp_path / "empty", "\n"), "is empty"),
        "two lines": (_secret(tmp_path / "two", "a\nb\n"), "more than one line"),
        "world-readable": (_secret(tmp_path / "open", "s3cret", 0o644), "chmod 600"),
        "huge": (_secret(tmp_path / "big", "x" * (MAX_SECRET_BYTES + 1)), "is at most"),
        "not text": (tmp_path / "bin", "not UTF-8"),
        "a folder": (tmp_path / "dir", "not a regular file"),
    }
    for what, (path, said) in wrong.items():
        with pytest.raises(CredentialError, match=said):
            read_secret(path)
        assert what


def test_a_login_needs_a_user_and_at_most_one_source_and_hides_its_secret(tmp_path):
    pw = _secret(tmp_path / "pw", "s3cret")
    assert load_login(None) is None
    assert load_login("car-1") == BrokerLogin("car-1", None)
    login = load_login("car-1", pw)
    assert login == BrokerLogin("car-1", "s3cret") and "s3cret" not in repr(login)
    with pytest.raises(CredentialError, match="needs a username"):
        load_login(None, pw)
    with pytest.raises(CredentialError, match="not both"):
        load_login("car-1", pw, "broker-password")
    creds = tmp_path / "creds"
    creds.mkdir()
    _secret(creds / "broker-password", "from-systemd\n", 0o400)
    environ = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert load_login("car-1", None, "broker-password", environ) == BrokerLogin(
        "car-1", "from-systemd"
    )
    with pytest.raises(CredentialError, match=r"CREDENTIALS_DIRECTORY is not set"):
        credential_path("broker-password", {})
    with pytest.raises(CredentialError, match="not a systemd credential name"):
        credential_path("../../etc/shadow", environ)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (0x86, "bad user name or password"),
        (0x87, "not authorized"),
        (0x8A, "banned"),
        (0x85, "client identifier not valid"),
        (0x88, None),  # server unavailable: an outage, retried as one
        (0x89, None),  # server busy
        (0x9F, None),  # connection rate exceeded
    ],
)
def test_only_refusals_no_retry_mends_are_permanent(code, reason):
    from aiomqtt.exceptions import MqttConnectError, MqttError

    assert permanent_refusal(
        MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=code))
    ) == (reason)
    assert permanent_refusal(MqttError("Disconnected during message iteration")) is None


def test_after_a_refusal_the_backoff_waits_in_the_upper_half_of_its_cap():
    backoff = ReconnectBackoff(base_s=0.5, cap_s=30.0, healthy_after_s=30.0)
    assert backoff.next_delay(0.0) <= 0.5
    backoff.refused()
    delays = [backoff.next_delay(1.0)]
    backoff.refused()
    delays.append(backoff.next_delay(2.0))
    assert all(15.0 <= d <= 30.0 for d in delays), delays
    assert backoff.ceiling_s == 30.0  # and it stays at the cap until a healthy connection
    backoff.connected(10.0)
    backoff.next_delay(100.0)
    assert backoff.ceiling_s == 1.0


# ---- the agent's config --------------------------------------------------------------


def _with_broker_lines(files, lines: str) -> Path:
    text = files.config_path.read_text().replace("[broker]\n", f"[broker]\n{lines}\n", 1)
    files.config_path.write_text(text)
    return files.config_path


def test_a_password_written_in_the_config_is_refused_and_named(tmp_path, fleet):
    files = write_vehicle(tmp_path, "car-1", port=1883, fleet=fleet)
    said = refused_at_start(_with_broker_lines(files, 'username = "car-1"\npassword = "hunter2"'))
    assert "never written in the config" in said and "password_file" in said
    assert "hunter2" not in said


@pytest.mark.parametrize(
    ("lines", "said"),
    [
        ('password_file = "pw"', "needs a username"),
        ('username = ""', "at least 1 character"),
    ],
)
def test_a_half_login_is_refused(tmp_path, fleet, lines, said):
    files = write_vehicle(tmp_path, "car-1", port=1883, fleet=fleet)
    with pytest.raises(ConfigError, match=said):
        load_config(_with_broker_lines(files, lines))


def test_an_unreadable_password_file_stops_the_start(tmp_path, fleet):
    files = write_vehicle(tmp_path, "car-1", port=1883, fleet=fleet)
    _secret(files.config_path.parent / "pw", "s3cret", 0o644)
    said = refused_at_start(_with_broker_lines(files, 'username = "car-1"\npassword_file = "pw"'))
    assert "readable by every user" in said


def test_tls_with_a_login_needs_the_ca_but_no_certificate(tmp_path, fleet):
    files = write_vehicle(tmp_path, "car-1", port=8883, fleet=fleet)
    text = files.config_path.read_text().replace('tls = false\nhost = "127.0.0.1"\n', "")
    files.config_path.write_text(text)
    (files.config_path.parent / "ca.pem").write_text("")
    _with_broker_lines(files, 'host = "broker.example"\ntls = true\nca_file = "ca.pem"')
    with pytest.raises(ConfigError, match="needs cert_file, key_file"):
        load_config(files.config_path)
    _with_broker_lines(files, 'username = "car-1"')
    assert load_config(files.config_path).broker.cert_file is None
    _with_broker_lines(files, 'cert_file = "car.pem"')
    with pytest.raises(ConfigError, match="go together"):
        load_config(files.config_path)


# ---- against a broker that wants a login ---------------------------------------------


@pytest.fixture
def login_broker(tmp_path):
    with LocalMosquitto(
        tmp_path / "mq", logins={"car-1": CAR_PASSWORD, "fleet": FLEET_PASSWORD}
    ) as b:
        yield b


def _car(tmp_path, fleet, port: int, password: str):
    files = write_vehicle(
        tmp_path, "car-1", port=port, fleet=fleet, extra=f"metrics_port = {free_port()}"
    )
    _secret(files.config_path.parent / "broker-password", password + "\n")
    _with_broker_lines(files, 'username = "car-1"\npassword_file = "broker-password"')
    return files


@contextlib.asynccontextmanager
async def _fleet_node(port: int, fleet, queue: JobQueue, files, password: str):
    collector = Collector(vehicles={"car-1": files.key.public_key()}, requester_key=fleet.requester)
    node = FleetNode(
        host="127.0.0.1",
        port=port,
        store=SqliteStore(queue),
        signing_key=fleet.job_key,
        collector=collector,
        lease_tick_s=0.2,
        login=lambda: BrokerLogin("fleet", password),
    )
    task = asyncio.create_task(node.run(), name="fleet")
    try:
        yield node
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.broker
async def test_a_car_and_the_fleet_with_logins_run_a_job(login_broker, fleet, tmp_path):
    files = _car(tmp_path, fleet, login_broker.port, CAR_PASSWORD)
    queue = JobQueue(tmp_path / "q.db")
    job = queue.submit(template(fleet.requester), now=time.time())
    async with (
        _fleet_node(login_broker.port, fleet, queue, files, FLEET_PASSWORD) as node,
        running_agent(files),
    ):
        await wait_for(lambda: job in node.collector.results, what="the result", timeout=20)
    assert queue.state_of(job)[0] == "done"
    cfg = load_config(files.config_path)
    assert (await doctor_broker(cfg)).verdict.name == "OK"
    queue.close()


@pytest.mark.broker
async def test_a_wrong_password_is_a_refusal_at_the_cap_not_an_outage(
    login_broker, fleet, tmp_path
):
    """The car, the fleet node and `doctor` all say "refused by the broker: <reason>"; the
    car's next try waits at least half the 30 s cap (so none comes within 2 s), and it keeps
    running."""
    files = _car(tmp_path, fleet, login_broker.port, "wrong")
    cfg = load_config(files.config_path)
    agent = build_agent(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop), name="agent")
    try:
        await wait_for(lambda: agent.status()["broker"]["last_error"], what="refused")
        error = agent.status()["broker"]["last_error"]
        assert error.startswith("refused by the broker: "), error
        reason = error.removeprefix("refused by the broker: ")
        assert reason in ("bad user name or password", "not authorized")
        registry = agent.metrics.registry
        assert registry is not None
        sample = {"reason": reason}
        assert registry.get_sample_value("edge_agent_broker_refusals_total", sample) == 1
        await asyncio.sleep(2.0)
        assert registry.get_sample_value("edge_agent_broker_refusals_total", sample) == 1
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)
    check = await doctor_broker(cfg)
    assert check.verdict.name == "FAIL" and "refused by the broker" in check.detail
    queue = JobQueue(tmp_path / "q.db")
    async with _fleet_node(login_broker.port, fleet, queue, files, "wrong too") as node:
        await wait_for(lambda: node.refusal is not None, what="fleet refused")
        assert node.refusal == reason and not node.ready.is_set()
    queue.close()


def _fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "CREDENTIALS_DIRECTORY": ""},
    )


@pytest.mark.broker
def test_fleet_tools_take_a_login_from_a_file_and_never_from_the_command_line(
    login_broker, tmp_path
):
    where = ["--host", "127.0.0.1", "--port", str(login_broker.port)]
    good = _secret(tmp_path / "fleet-password", FLEET_PASSWORD + "\n")
    bad = _secret(tmp_path / "bad-password", "nope\n")
    seen = _fleet(
        "vehicles", *where, "--username", "fleet", "--password-file", str(good), "--wait", "0.5"
    )
    assert seen.returncode == ExitCode.OK, seen.stderr
    refused = _fleet(
        "vehicles", *where, "--username", "fleet", "--password-file", str(bad), "--wait", "0.5"
    )
    assert refused.returncode == ExitCode.UNAVAILABLE
    assert "refused by the broker: " in refused.stderr and "nope" not in refused.stderr
    anonymous = _fleet("vehicles", *where, "--wait", "0.5")
    assert anonymous.returncode == ExitCode.UNAVAILABLE
    assert "refused by the broker: " in anonymous.stderr
    unsafe = _secret(tmp_path / "open-password", FLEET_PASSWORD, 0o644)
    usage = [
        (["--username", "fleet", "--password-file", str(unsafe)], "chmod 600"),
        (["--password-file", str(good)], "needs a username"),
        (["--username", "fleet", "--password-credential", "pw"], "CREDENTIALS_DIRECTORY"),
        (["--password", FLEET_PASSWORD], "--password is not taken"),
        (["--token", FLEET_PASSWORD], "--password-file FILE"),
    ]
    for extra, said in usage:
        out = _fleet("vehicles", *where, *extra)
        assert out.returncode == ExitCode.USAGE, (extra, out.stderr)
        assert said in out.stderr, (extra, out.stderr)
