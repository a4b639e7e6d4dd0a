"""Operations: systemd notify and watchdog, Prometheus metrics, status, exit codes."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import pytest

from agent.runtime.systemd import Notifier
from broker.local import free_port
from tests.support import job_spec, observing, running_agent, signed, wait_for, write_vehicle


class FakeSystemd:
    """A real datagram socket where systemd's would be; collects what the agent sends."""

    def __init__(self, path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))


@pytest.fixture
def systemd(tmp_path):
    fake = FakeSystemd(tmp_path / "notify")
    yield fake
    fake.sock.close()


def test_notifier_speaks_sd_notify(tmp_path, systemd):
    """READY, STATUS, WATCHDOG and STOPPING arrive as KEY=value datagrams on $NOTIFY_SOCKET."""
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "4000000"})
    assert n.enabled and n.watchdog_interval_s == 2.0
    assert n.ready("gate open")
    assert n.watchdog()
    assert n.stopping()
    assert systemd.drain() == [
        {"READY": "1", "STATUS": "gate open"},
        {"WATCHDOG": "1"},
        {"STOPPING": "1", "STATUS": "stopping"},
    ]


def test_notifier_is_a_no_op_outside_systemd_and_for_other_pids():
    """Without $NOTIFY_SOCKET nothing is sent; a watchdog meant for another pid is ignored."""
    assert Notifier({}).ready("x") is False
    other = Notifier(
        {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}
    )
    assert other.watchdog_interval_s is None
    assert other.send(READY="1") is False, "an unreachable socket is not an exception"


def test_abstract_notify_socket(tmp_path):
    """An @-prefixed NOTIFY_SOCKET is Linux's abstract namespace."""
    name = f"edge-agent-test-{free_port()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("hello")
        assert server.recv(100) == b"STATUS=hello"
    finally:
        server.close()


@pytest.mark.broker
async def test_agent_is_ready_pings_the_watchdog_and_serves_metrics(
    mosquitto, fleet, tmp_path, monkeypatch, systemd
):
    """Under a (fake) systemd the agent says READY with its gate state, pings the watchdog while
    healthy, says STOPPING at the end; /metrics reports the gate and the jobs."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    port = free_port()
    files = write_vehicle(
        tmp_path, "veh-ops", port=mosquitto.port, fleet=fleet, extra=f"metrics_port = {port}"
    )
    async with observing(mosquitto.port, "veh-ops") as obs, running_agent(files) as agent:
        await obs.send_job(signed(job_spec(fleet, "veh-ops"), fleet.job_key))
        await wait_for(lambda: "succeeded" in obs.kinds(), what="job done")
        await wait_for(
            lambda: sum("WATCHDOG" in m for m in systemd.drain()) >= 2,
            timeout=8,
            what="watchdog pings",
        )
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        )
        metrics = body.decode()
        assert "edge_agent_gate_open 1.0" in metrics
        assert 'edge_agent_jobs_total{kind="succeeded",reason=""} 1.0' in metrics
        assert 'edge_agent_gate_reason{reason="not_parked"} 0.0' in metrics
        assert agent.healthy(0.0, limit_s=0.1)
        assert not agent.healthy(0.5, limit_s=0.1), "a stalled loop is not healthy"
    messages = systemd.drain()
    ready = next(m for m in messages if "READY" in m)
    assert ready["STATUS"].startswith("gate open; connected")
    assert {"STOPPING": "1", "STATUS": "stopping"} in messages


def test_the_daemon_reads_its_key_without_the_general_key_loader(tmp_path):
    """Everything `edge-agent run` imports, plus reading the vehicle key, leaves out
    cryptography's serialization package and the key types it drags in (1.7 MB)."""
    import subprocess
    import sys

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.kit.keyfiles import write_private_key

    key = Ed25519PrivateKey.generate()
    write_private_key(tmp_path / "vehicle.key", key)
    probe = f"""
import sys
from pathlib import Path
import agent.assembly, agent.cli, agent.daemon
from agent.kit.keyfiles import load_signing_key
key = load_signing_key(Path({str(tmp_path / "vehicle.key")!r}))
print("public:", key.public_key().public_bytes_raw().hex())
print("loaded:", sorted(m for m in sys.modules if m.endswith((".serialization", ".rsa", ".dsa"))))
"""
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert f"public: {key.public_key().public_bytes_raw().hex()}" in out
    assert "loaded: []" in out


def test_metrics_off_record_nothing_and_never_load_prometheus_client():
    """With `metrics_port = 0` (the default) every instrument takes its updates and records
    nothing, and prometheus-client is never imported (1.6 MB of the daemon's memory);
    asking such metrics to serve is an error, not a silent no-op."""
    import subprocess
    import sys

    probe = """
import sys
from agent.runtime.metrics import AgentMetrics
m = AgentMetrics(enabled=False)
m.jobs.labels(kind="succeeded", reason="").inc()
m.gate(True, ["not_parked"])
m.job_seconds.observe(0.5)
m.duty.set(0.5)
assert m.registry is None
try:
    m.serve(9)
except RuntimeError as exc:
    print("serve refused:", exc)
print("prometheus loaded:", "prometheus_client" in sys.modules)
on = AgentMetrics(enabled=True)
on.jobs.labels(kind="succeeded", reason="").inc()
from prometheus_client import generate_latest
text = generate_latest(on.registry).decode()
print("counted:", 'edge_agent_jobs_total{kind="succeeded",reason=""} 1.0' in text)
"""
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert "serve refused: metrics are off" in out
    assert "prometheus loaded: False" in out
    assert "counted: True" in out
