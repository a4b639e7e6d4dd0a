"""A broker that turns on the agent: a packet over the agent's limit, a peer that accepts and
then fails. The agent is a real `edge-agent run` process; what it did is measured from outside
(the broker's socket, the kernel's record of its peak memory)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.hostile_broker import HostileBroker
from tests.support import FleetKeys, write_vehicle


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@contextlib.asynccontextmanager
async def agent_process(tmp_path: Path, port: int, fleet: FleetKeys) -> AsyncIterator[int]:
    """`edge-agent run` against the broker on `port`; yields its pid."""
    files = write_vehicle(tmp_path, "veh-hostile", port=port, fleet=fleet)
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen(  # noqa: ASYNC220 - Popen returns at once; the agent runs apart
        [sys.executable, "-m", "agent.cli", "run", "--config", str(files.config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc.pid
        assert proc.poll() is None, (tmp_path / "agent.log").read_text()[-3000:]
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        log.close()


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.timeout(90)
async def test_an_oversized_packet_is_refused_before_it_is_buffered(tmp_path, fleet):
    """A broker announcing a 100 MB PUBLISH: the agent hangs up after the fixed header (the
    socket takes no more than its buffers), its peak memory stays near idle, and it
    reconnects and is refused again, still running."""
    broker = HostileBroker("oversized", announce_bytes=100 * 1024 * 1024)
    await broker.start()
    try:
        async with agent_process(tmp_path, broker.port, fleet) as pid:
            await wait_until(lambda: broker.connections >= 2, 30, "a reconnection")
            await wait_until(lambda: len(broker.bytes_streamed) >= 2, 10, "a second attempt")
            peak_mb = _status_kb(pid, "VmHWM") / 1024
            now_mb = _status_kb(pid, "VmRSS") / 1024
            log = (tmp_path / "agent.log").read_text()
    finally:
        await broker.stop()
    streamed_mb = max(broker.bytes_streamed) / 2**20
    # Loopback socket buffers hold a few MB; reading the packet would take all 100.
    assert streamed_mb < 16, f"the agent read {streamed_mb:.1f} MB of a 100 MB packet"
    assert peak_mb < now_mb + 20, f"peak RSS {peak_mb:.0f} MB against {now_mb:.0f} MB now"
    assert "oversized_packet_refused" in log


@pytest.mark.timeout(60)
async def test_a_peer_that_accepts_then_fails_gets_a_growing_backoff(tmp_path, fleet):
    """A broker that sends CONNACK, then half a PUBACK and hangs up: the agent's reconnects
    slow down (the backoff is not reset by a connection that did not stay healthy)."""
    broker = HostileBroker("flaky_puback")
    await broker.start()
    try:
        async with agent_process(tmp_path, broker.port, fleet):
            await wait_until(lambda: broker.connections >= 1, 20, "a first connection")
            first = broker.connected_at[0]
            await asyncio.sleep(12.0)
            within = [t for t in broker.connected_at if t - first <= 12.0]
    finally:
        await broker.stop()
    # Reset on every CONNACK this was ~40 connections in 12 s; growing (0.5, 1, 2, 4, 8 s
    # ceilings, full jitter) it is about 6, and 12 or more has odds below 1 in 1000.
    assert len(within) < 12, f"{len(within)} connections in 12 s"
    # Some wait over a second: between two connections, or after the last one in the window
    # (three connections in a row closed right after CONNACK back off 30 s at once).
    gaps = [b - a for a, b in itertools.pairwise(within)] + [first + 12.0 - within[-1]]
    assert max(gaps) > 1.0, gaps
