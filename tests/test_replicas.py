"""Fleet nodes as replicas on one PostgreSQL store, through real outages: a replica killed
with SIGKILL, every node away for 30 s, the broker restarted. The cars are the simulator's
(broker/simulator.py): real MQTT connections speaking the real wire, with simulated compute."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.kit.keyfiles import write_private_key
from agent.wire.bundle import decode_result_body
from agent.wire.keys import KeyRing
from broker.collector import Collector
from broker.commands import digit_templates
from broker.fleet import FleetNode
from broker.local import LocalMosquitto
from broker.shipped import MODELS, SCENARIOS
from broker.sim import car as sim_car
from broker.sim import fleet as simulator
from broker.store import JobStore, open_store
from tests.support import FleetKeys

pytestmark = pytest.mark.broker
PARKED = SCENARIOS / "parked-charging.toml"  # every car's gate open all the time


@dataclass
class Rig:
    dir: Path
    keys: FleetKeys
    broker: LocalMosquitto
    dsn: str
    ids: list[str]

    def settings(self, compute_s: float) -> sim_car.Settings:
        return sim_car.Settings(
            host="127.0.0.1",
            port=self.broker.port,
            trusted_keys=KeyRing.of(self.keys.job_key.public_key()).to_file(),
            seed="test",
            compute_s=compute_s,
            capacity=1,
            time_scale=1.0,
            model=simulator.digits_model(),
        )

    def serve(self, node: str, *extra: str) -> subprocess.Popen[bytes]:
        with (self.dir / f"{node}.log").open("wb") as log:
            return subprocess.Popen(
                [
                    sys.executable, "-m", "broker.cli", "serve",
                    "--queue", self.dsn,
                    "--job-key", str(self.dir / "job.key"),
                    "--requester-key", str(self.dir / "requester.key"),
                    "--registry", str(self.dir / "registry.json"),
                    "--port", str(self.broker.port),
                    "--node", node,
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def node(self, store: JobStore, name: str) -> FleetNode:
        from agent.wire.codec import parse_model
        from agent.wire.errors import Reason
        from agent.wire.keys import VehicleRegistryFile, ed25519_public

        registry = parse_model(
            (self.dir / "registry.json").read_bytes(),
            VehicleRegistryFile,
            what="registry",
            reason=Reason.MALFORMED_PAYLOAD,
        )
        collector = Collector(
            vehicles={v.vehicle_id: ed25519_public(v.public_key) for v in registry.vehicles},
            requester_key=self.keys.requester,
        )
        return FleetNode(
            host="127.0.0.1",
            port=self.broker.port,
            store=store,
            signing_key=self.keys.job_key,
            collector=collector,
            node=name,
            session_expiry_s=300,  # as `edge-fleet serve` does
        )


@pytest.fixture
def rig(tmp_path: Path, pg_dsn: str) -> object:
    keys = FleetKeys()
    write_private_key(tmp_path / "job.key", keys.job_key)
    write_private_key(tmp_path / "requester.key", keys.requester)
    ids = sim_car.vehicle_ids("car", 30)
    (tmp_path / "registry.json").write_bytes(sim_car.registry("test", ids))
    with LocalMosquitto(tmp_path / "mosquitto", persistence=True) as broker:
        yield Rig(tmp_path, keys, broker, pg_dsn, ids)


async def _submit(rig: Rig, store: JobStore, n: int) -> None:
    for template in digit_templates(MODELS, rig.dir / "requester.key", n):
        await store.submit(template, now=time.time())


@contextlib.asynccontextmanager
async def _cars(rig: Rig, n: int, compute_s: float) -> AsyncIterator[None]:
    scenarios = simulator._scenarios(PARKED)
    task = asyncio.create_task(
        simulator.run_vehicles(rig.ids[:n], rig.settings(compute_s), scenarios, 0)
    )
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _until(store: JobStore, done: int, timeout_s: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = await store.counts()
        if counts.get("done", 0) + counts.get("failed", 0) >= done:
            return counts
        await asyncio.sleep(0.25)
    return await store.counts()


async def _rows(dsn: str, sql: str) -> list[tuple]:
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(sql)
        return await cur.fetchall()


@pytest.mark.timeout(180)
async def test_three_replicas_split_the_work_and_a_kill_9_loses_no_job(rig: Rig):
    """500 jobs, 3 `edge-fleet serve` processes on one PostgreSQL store, 30 cars; one replica
    SIGKILLed a third of the way. Every job ends done with exactly one accepted result; the
    survivors end the dead replica's session so it stops taking its turn."""
    store = await open_store(rig.dsn)
    await _submit(rig, store, 500)
    nodes = [rig.serve(f"n{k}", "--lease-s", "5", "--reap-after", "2") for k in range(3)]
    try:
        async with _cars(rig, 30, compute_s=0.02):
            await _until(store, 170, timeout_s=60)
            nodes[1].send_signal(signal.SIGKILL)
            counts = await _until(store, 500, timeout_s=120)
        assert counts == {"done": 500}, counts
    finally:
        for p in nodes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in nodes:
            p.wait(timeout=15)
    rows = await _rows(rig.dsn, "SELECT job_id, body FROM results")
    assert len(rows) == 500 and len({r[0] for r in rows}) == 500, "one result per job"
    assert all(decode_result_body(bytes(body)).job_id == job for job, body in rows)
    logs = {k: (rig.dir / f"n{k}.log").read_text() for k in range(3)}
    assert "peer_session_ended" in logs[0] + logs[2], "a survivor reaped the dead replica"
    for k in (0, 2):  # each survivor's last line is its summary at SIGTERM
        summary = json.loads(logs[k].strip().splitlines()[-1])
        assert summary["results"] > 0, f"n{k} served: {summary}"
    await store.close()


@pytest.mark.timeout(180)
async def test_every_fleet_node_away_30_s_loses_no_result(rig: Rig):
    """Cars finish their jobs while every fleet node is down for 30 s: the nodes' persistent
    sessions keep the results, and when the nodes return each is accepted, none run again."""
    store = await open_store(rig.dsn, lease_s=300)
    await _submit(rig, store, 40)
    nodes = [rig.node(store, f"m{k}") for k in range(2)]
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    async with _cars(rig, 20, compute_s=8.0):  # 4-12 s: every job ends inside the outage
        deadline = time.monotonic() + 30
        while (await store.counts()).get("leased", 0) < 20 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        for t in tasks:  # a clean DISCONNECT: the sessions stay, as after a crash
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        in_flight = await store.counts()
        assert in_flight.get("leased") == 20, in_flight
        await asyncio.sleep(30)  # the cars' results go to the broker, for the nodes' sessions
        assert (await store.counts()).get("done", 0) == 0, "nobody was there to accept"
        tasks = [asyncio.create_task(n.run()) for n in nodes]
        counts = await _until(store, 40, timeout_s=60)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert counts == {"done": 40}, counts
    attempts = await _rows(rig.dsn, "SELECT attempts FROM jobs")
    first_twenty = sorted(a for (a,) in attempts)[:20]
    assert first_twenty == [1] * 20, "results from the outage were accepted, not re-run"
    await store.close()


@pytest.mark.timeout(120)
async def test_a_broker_restart_with_persistence_loses_no_job(rig: Rig):
    """The broker is stopped and started again mid-run (persistence on): the nodes and cars
    reconnect, and every job ends done."""
    store = await open_store(rig.dsn, lease_s=5)
    await _submit(rig, store, 200)
    nodes = [rig.node(store, f"r{k}") for k in range(2)]
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    async with _cars(rig, 20, compute_s=0.05):
        await _until(store, 60, timeout_s=60)
        rig.broker.stop()
        await asyncio.sleep(1.0)
        rig.broker.start()
        counts = await _until(store, 200, timeout_s=90)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert counts == {"done": 200}, counts
    assert all(n.reconnects >= 1 for n in nodes), "the nodes did lose the broker"
    await store.close()


async def test_a_node_waiting_for_a_puback_notices_the_broker_going_at_once(tmp_path: Path):
    """aiomqtt fails a PUBACK awaited when the broker went away only after its 10 s timeout,
    and only the message iterator notices a disconnection. A fleet node's receiver both reads
    and publishes, so it could sit blind that long after a broker restart. The
    connection-watch task (agent.kit.mqtt.connection_lost) ends the connection's tasks at
    once: here a publish that can never be acknowledged (the broker is stopped under it, then
    killed) is given up within seconds, not ten (10.0 s without the watch)."""
    import aiomqtt

    from agent.kit.mqtt import connection_lost, publish_acked

    with LocalMosquitto(tmp_path / "mq") as broker:
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="watched") as client:
            await client.subscribe("t", qos=1)
            broker._proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]  # no PUBACK
            started = time.monotonic()

            async def lose_the_broker() -> None:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(publish_acked(client, "t", b"x"))
                    tg.create_task(connection_lost(client))
                    await asyncio.sleep(0.5)
                    broker._proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]

            with pytest.raises(ExceptionGroup) as ended:
                await lose_the_broker()
            took = time.monotonic() - started
            assert ended.group_contains(aiomqtt.MqttError)
    assert took < 5.0, f"the lost connection was noticed after {took:.1f} s"
