"""What an operator sees at 3 a.m.: the gate's state from the first second, journald
priorities, a metrics endpoint that answers only /metrics, the broker and its last error in
`status`, a duplicate vehicle id named as such, and `status` on a stopped agent."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from agent.kit import logs
from agent.kit.exitcodes import ExitCode
from broker.local import free_port
from tests.support import running_agent, wait_for, write_vehicle

pytestmark = pytest.mark.broker


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 - http://127.0.0.1
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_a_gate_closed_from_the_start_is_logged_with_priority_and_in_the_metrics(
    mosquitto, fleet, tmp_path
) -> None:
    """Not opted in at start: a `gate_closed` event with the reason, journald's priority in
    front of each line when stdout is the journal, and the gate metrics set at once."""
    port = free_port()
    files = write_vehicle(
        tmp_path, "veh-closed", port=mosquitto.port, fleet=fleet, opted_in=False,
        extra=f"metrics_port = {port}",
    )  # fmt: skip
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(files.config_path)],
        stdout=write_end, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    os.close(write_end)
    out = os.fdopen(read_end)
    try:
        lines = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = out.readline()
            lines.append(line)
            if '"gate_closed"' in line:
                break
        closed = next(line for line in lines if '"gate_closed"' in line)
        assert closed.startswith("<6>{"), closed  # info, for journald
        event = json.loads(closed[3:])
        assert "not_opted_in" in event["reasons"]
        assert event["level"] == "info" and event["timestamp"].endswith("Z")
        body = ""
        for _ in range(50):
            status, body = _get(f"http://127.0.0.1:{port}/metrics")
            if "edge_agent_broker_connected 1.0" in body:
                break
            time.sleep(0.1)
        assert 'edge_agent_gate_reason{reason="not_opted_in"} 1.0' in body
        assert "edge_agent_gate_open 0.0" in body
        assert "edge_agent_broker_connected 1.0" in body
        assert 'edge_agent_build_info{version="' in body
        assert "process_resident_memory_bytes" in body
        status, text = _get(f"http://127.0.0.1:{port}/anything")
        assert status == 404 and "/metrics" in text
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        out.close()


def test_journal_priority_follows_the_level() -> None:
    render = logs.JournalPriority()
    for level, priority in (("error", 3), ("warning", 4), ("info", 6), ("debug", 7)):
        line = render(None, level, {"event": "x", "level": level})
        assert line.startswith(f"<{priority}>{{") and json.loads(line[3:])["event"] == "x"
    assert not logs.to_journal({}), "no JOURNAL_STREAM: plain JSON"
    assert not logs.to_journal({"JOURNAL_STREAM": "1:2"}), "a stream that is not our stdout"


async def test_two_agents_with_one_vehicle_id_are_named_and_stop_flapping(
    mosquitto, fleet, tmp_path
) -> None:
    """Two agents with one vehicle id (a copied config): each connection takes the other's
    session. The agents say so in the log and `status`, and back off for 30 s instead of
    flapping every half second."""
    one = write_vehicle(tmp_path / "one", "veh-dup", port=mosquitto.port, fleet=fleet)
    two = write_vehicle(tmp_path / "two", "veh-dup", port=mosquitto.port, fleet=fleet)
    async with running_agent(one) as a, running_agent(two) as b:

        def named() -> list[str]:
            errors = [x.status()["broker"]["last_error"] or "" for x in (a, b)]
            return [e for e in errors if "share this vehicle id" in e]

        await wait_for(lambda: bool(named()), timeout=30, what="the duplicate id named")
        assert "veh-dup" in named()[0]
        reconnects = a.counts.get("reconnects", 0) + b.counts.get("reconnects", 0)
        await asyncio.sleep(5)
        later = a.counts.get("reconnects", 0) + b.counts.get("reconnects", 0)
        assert later - reconnects <= 2, "still flapping"


def test_status_of_a_stopped_agent_is_unavailable_not_a_config_error(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", "--socket", str(tmp_path / "none.sock")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == ExitCode.UNAVAILABLE
    assert "is the agent running?" in out.stderr and "systemctl status edge-agent" in out.stderr
