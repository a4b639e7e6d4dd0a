"""What a fleet operator sees: `edge-fleet queue`, `edge-fleet vehicles`, the fleet node's
metrics, `edge-fleet simulate --registry-only`; each also fed what an operator gets wrong."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from agent.kit.exitcodes import ExitCode
from agent.kit.keyfiles import write_private_key
from agent.wire.codec import dump_model
from agent.wire.keys import KeyRing, VehicleRegistryFile
from agent.wire.messages import VehicleStatus
from agent.wire.topics import Channel, topic
from broker.collector import Collector
from broker.commands import digit_templates
from broker.fleet import FleetNode
from broker.local import LocalMosquitto
from broker.shipped import MODELS, SCENARIOS
from broker.sim import car as sim_car
from broker.sim import fleet as sim_fleet
from broker.store import open_store
from tests.support import FleetKeys, fleet_client
from tests.test_fleet_cli import fleet


def test_queue_shows_states_the_oldest_lease_and_parked_cars(tmp_path: Path) -> None:
    keys = FleetKeys()
    write_private_key(tmp_path / "requester.key", keys.requester)
    out = fleet("submit", "--queue", "q.db", "--requester-key", "requester.key", "--count", "3",
                cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr

    async def lease_one() -> None:
        store = await open_store(tmp_path / "q.db")
        await store.lease("car-1", 1, {sim_fleet.digits_model().sha256}, now=time.time() - 42)
        await store.park("car-2", {"0" * 64}, now=time.time())
        await store.close()

    asyncio.run(lease_one())
    out = fleet("queue", "--queue", "q.db", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["jobs"] == {"queued": 2, "leased": 1, "done": 0, "failed": 0}
    assert 41 <= shown["oldest_lease_age_s"] <= 60 and shown["parked_vehicles"] == 1
    text = fleet("queue", "--queue", "q.db", cwd=tmp_path).stdout
    assert "queued  2" in text and "oldest lease: 4" in text and "parked" in text


@pytest.mark.parametrize(
    ("where", "says"),
    [
        ("missing.db", "no queue at missing.db"),
        ("postgresql://edge:pw@127.0.0.1:1/none", "cannot connect to the PostgreSQL store"),
    ],
)
def test_queue_of_no_store_says_so(tmp_path: Path, where: str, says: str) -> None:
    out = fleet("queue", "--queue", where, cwd=tmp_path)
    assert (
        out.returncode == ExitCode.CONFIG and says in out.stderr and "Traceback" not in out.stderr
    )
    assert "pw" not in out.stderr, "no password printed"


@pytest.mark.broker
def test_vehicles_lists_retained_statuses_and_names_a_garbled_one(mosquitto, tmp_path) -> None:
    async def publish() -> None:
        async with fleet_client(mosquitto.port, identifier="status-writer") as client:
            status = VehicleStatus(
                vehicle_id="ops-car", online=True, gate_open=False, reasons=("unplugged",),
                at=time.time() - 5, policy_version=3,
            )  # fmt: skip
            await client.publish(
                topic("ops-car", Channel.STATUS), dump_model(status), qos=1, retain=True
            )
            await client.publish(
                topic("ops-garbled", Channel.STATUS), b"{not json", qos=1, retain=True
            )

    asyncio.run(publish())
    out = fleet("vehicles", "--port", str(mosquitto.port), "--json", "--wait", "1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)["vehicles"]
    assert shown["ops-car"]["connected"] is True and shown["ops-car"]["gate_open"] is False
    assert shown["ops-car"]["reasons"] == ["unplugged"] and shown["ops-car"]["policy_version"] == 3
    assert shown["ops-garbled"]["error"].startswith("malformed_payload")
    table = fleet("vehicles", "--port", str(mosquitto.port), "--wait", "1", cwd=tmp_path).stdout
    assert "ops-car" in table and "unplugged" in table and "vehicles" in table

    async def clear() -> None:  # the session's broker is shared by later tests
        async with fleet_client(mosquitto.port, identifier="status-clearer") as client:
            for vid in ("ops-car", "ops-garbled"):
                await client.publish(topic(vid, Channel.STATUS), b"", qos=1, retain=True)

    asyncio.run(clear())


def test_vehicles_of_no_broker_and_plaintext_to_a_remote_one_say_so(tmp_path: Path) -> None:
    out = fleet("vehicles", "--port", "1", "--wait", "0.5", cwd=tmp_path)
    assert out.returncode == ExitCode.UNAVAILABLE and "cannot reach the broker" in out.stderr
    out = fleet("vehicles", "--host", "broker.example", cwd=tmp_path)
    assert out.returncode == ExitCode.USAGE and "refusing plaintext" in out.stderr


def test_simulate_writes_the_registry_of_the_cars_it_would_run(tmp_path: Path) -> None:
    keys = FleetKeys()
    (tmp_path / "trusted.json").write_bytes(KeyRing.of(keys.job_key.public_key()).to_file())
    args = ["simulate", "--vehicles", "5", "--trusted-keys", "trusted.json",
            "--registry-out", "reg.json", "--registry-only", "--seed", "s1"]  # fmt: skip
    assert fleet(*args, cwd=tmp_path).returncode == 0
    registry = VehicleRegistryFile.model_validate_json((tmp_path / "reg.json").read_bytes())
    assert [v.vehicle_id for v in registry.vehicles] == sim_car.vehicle_ids("sim", 5)
    again = sim_car.registry("s1", sim_car.vehicle_ids("sim", 5))
    assert (tmp_path / "reg.json").read_bytes() == again, "the same seed gives the same cars"
    for bad, says in ((["--vehicles", "0"], "at least 1"), (["--time-scale", "x"], "number")):
        out = fleet(*args[:1], *bad, *args[3:], cwd=tmp_path)
        assert out.returncode == 2 and says in out.stderr
    (tmp_path / "trusted.json").write_text("{}")
    out = fleet(*args, cwd=tmp_path)
    assert out.returncode == ExitCode.CONFIG and "trusted.json" in out.stderr


@pytest.mark.broker
async def test_the_fleet_nodes_metrics_count_what_happened(tmp_path, pg_dsn) -> None:
    """Three simulated cars run ten jobs through a node on PostgreSQL: the metrics say ten
    leases, ten accepted results, ten done, three cars online, and a refused message."""
    with LocalMosquitto(tmp_path / "mosquitto") as mosquitto:
        await _metrics_run(mosquitto, tmp_path, pg_dsn)


async def _metrics_run(mosquitto: LocalMosquitto, tmp_path: Path, pg_dsn: str) -> None:
    keys = FleetKeys()
    write_private_key(tmp_path / "requester.key", keys.requester)
    ids = sim_car.vehicle_ids("met", 3)
    store = await open_store(pg_dsn)
    for template in digit_templates(MODELS, tmp_path / "requester.key", 10):
        await store.submit(template, now=time.time())
    registry = VehicleRegistryFile.model_validate_json(sim_car.registry("m", ids))
    from agent.wire.keys import ed25519_public

    node = FleetNode(
        host="127.0.0.1",
        port=mosquitto.port,
        store=store,
        signing_key=keys.job_key,
        collector=Collector(
            vehicles={v.vehicle_id: ed25519_public(v.public_key) for v in registry.vehicles},
            requester_key=keys.requester,
        ),
        node="metrics",
        lease_tick_s=0.2,
        session_expiry_s=0,
    )
    settings = sim_car.Settings(
        host="127.0.0.1", port=mosquitto.port, trusted_keys=KeyRing.of(keys.job_key.public_key()).to_file(),
        seed="m", compute_s=0.01, capacity=1, time_scale=1.0, model=sim_fleet.digits_model(),
    )  # fmt: skip
    node_task = asyncio.create_task(node.run())
    scenarios = sim_fleet._scenarios(SCENARIOS / "parked-charging.toml")
    cars = asyncio.create_task(sim_fleet.run_vehicles(ids, settings, scenarios, 0))
    try:
        await asyncio.wait_for(node.ready.wait(), 10)
        async with fleet_client(mosquitto.port, identifier="garbage") as client:
            await client.publish(topic("met-00000", Channel.WORK), b"garbage", qos=1)
        deadline = time.monotonic() + 30
        while (await store.counts()).get("done", 0) < 10 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        # The queue gauges are read every 5 s (broker/fleet.py QUEUE_GAUGES_EVERY_S).
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            if (
                'edge_fleet_queue_jobs{state="done"} 10.0'
                in generate_latest(node.metrics.registry).decode()
            ):
                break
            await asyncio.sleep(0.2)
    finally:
        for task in (cars, node_task):
            task.cancel()
        await asyncio.gather(cars, node_task, return_exceptions=True)
    text = generate_latest(node.metrics.registry).decode()
    assert "edge_fleet_leases_total 10.0" in text
    assert 'edge_fleet_results_total{outcome="accepted"} 10.0' in text
    assert 'edge_fleet_queue_jobs{state="done"} 10.0' in text
    assert 'edge_fleet_vehicles{state="online"} 3.0' in text
    assert 'edge_fleet_refused_total{channel="work",reason="malformed_payload"} 1.0' in text
    await store.close()


@pytest.mark.broker
async def test_a_node_starting_takes_retained_statuses_as_its_view_not_as_news(tmp_path) -> None:
    """Statuses the broker kept (retained) reach a starting node: they fill its view, but an
    old 'offline' does not take a car's current lease away, and old garbage is not counted
    as refused (Mosquitto replays retained messages to shared subscriptions too)."""
    keys = FleetKeys()
    write_private_key(tmp_path / "requester.key", keys.requester)
    store = await open_store(tmp_path / "q.db")
    (template,) = digit_templates(MODELS, tmp_path / "requester.key", 1)
    job = await store.submit(template, now=time.time())
    await store.lease("old-car", 1, {sim_fleet.digits_model().sha256}, now=time.time())
    with LocalMosquitto(tmp_path / "mosquitto") as mosquitto:
        async with fleet_client(mosquitto.port, identifier="status-writer") as client:
            offline = VehicleStatus(vehicle_id="old-car", online=False, gate_open=False, at=1.0)
            await client.publish(
                topic("old-car", Channel.STATUS), dump_model(offline), qos=1, retain=True
            )
            await client.publish(topic("junk-car", Channel.STATUS), b"{", qos=1, retain=True)
        node = FleetNode(
            host="127.0.0.1",
            port=mosquitto.port,
            store=store,
            signing_key=keys.job_key,
            collector=Collector(vehicles={}, requester_key=keys.requester),
        )
        task = asyncio.create_task(node.run())
        try:
            await asyncio.wait_for(node.ready.wait(), 10)
            deadline = time.monotonic() + 5
            while "old-car" not in node.status and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert node.status["old-car"].online is False, "the view has it"
    assert (await store.state_of(job))[0] == "leased", "no lease taken on old news"
    assert node.refused == {}
    await store.close()


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"[]", b'{"online": false}', b'{"client_id": "x"}', b"x" * 5000],
)
def test_a_garbled_peer_presence_is_ignored_not_reaped(raw: bytes) -> None:
    """Presence messages on fleet/v1/nodes/<group>/<node> are read by every node: garbage
    (or an empty retained message) marks no peer gone, so no session is ended for it."""
    from broker.peers import Peers

    peers = Peers(
        group="fleet", node="me", client_id="fleet-me", host="127.0.0.1", port=1, tls=None,
        reap_after_s=1.0, clock=lambda: 100.0,
    )  # fmt: skip
    peers.seen("fleet/v1/nodes/fleet/other", raw)
    assert peers.gone_since == {} and peers.online == set()
    gone = json.dumps({"node": "other", "client_id": "fleet-other", "online": False, "at": 1})
    peers.seen("fleet/v1/nodes/fleet/other", gone.encode())
    assert peers.gone_since == {"other": (100.0, "fleet-other")}, "a well-formed one counts"
    peers.seen("fleet/v1/nodes/fleet/me", gone.replace("other", "me").encode())
    assert "me" not in peers.gone_since, "a node never reaps itself"


@pytest.mark.broker
async def test_simulated_cars_with_their_own_certificates_work_over_mutual_tls(tmp_path) -> None:
    """`edge-fleet simulate --pki`: each simulated car connects with its own certificate from
    `edge-fleet provision` (the broker's ACL confines it to its own topics), and a fleet node
    on TLS serves them ten jobs."""
    from agent.kit.mqtt import client_tls
    from broker.provision import provision

    keys = FleetKeys()
    write_private_key(tmp_path / "requester.key", keys.requester)
    (tmp_path / "trusted.json").write_bytes(KeyRing.of(keys.job_key.public_key()).to_file())
    ids = sim_car.vehicle_ids("tls", 3)
    pki = provision(tmp_path / "pki", ids)
    store = await open_store(tmp_path / "q.db")
    for template in digit_templates(MODELS, tmp_path / "requester.key", 10):
        await store.submit(template, now=time.time())
    registry = VehicleRegistryFile.model_validate_json(sim_car.registry("tls-seed", ids))
    from agent.wire.keys import ed25519_public

    with LocalMosquitto(tmp_path / "mosquitto", pki=pki) as mosquitto:
        node = FleetNode(
            host="localhost",
            port=mosquitto.port,
            tls=client_tls(pki.ca, pki.fleet.cert, pki.fleet.key),
            store=store,
            signing_key=keys.job_key,
            collector=Collector(
                vehicles={v.vehicle_id: ed25519_public(v.public_key) for v in registry.vehicles},
                requester_key=keys.requester,
            ),
            node="tls",
            lease_tick_s=0.2,
        )
        node_task = asyncio.create_task(node.run())
        try:
            await asyncio.wait_for(node.ready.wait(), 10)
            sim = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "broker.cli", "simulate", "--vehicles", "3",
                "--prefix", "tls", "--seed", "tls-seed", "--pki", str(tmp_path / "pki"),
                "--host", "localhost", "--port", str(mosquitto.port),
                "--trusted-keys", str(tmp_path / "trusted.json"),
                "--registry-out", str(tmp_path / "reg.json"),
                "--scenarios", str(SCENARIOS / "parked-charging.toml"),
                "--time-scale", "1", "--compute-ms", "10", "--duration", "12",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(sim.communicate(), 60)
        finally:
            node_task.cancel()
            await asyncio.gather(node_task, return_exceptions=True)
    assert sim.returncode == 0, err.decode()[-2000:]
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert report["connected_peak"] == 3
    assert (await store.counts()) == {"done": 10}
    assert len(node.collector.results) == 10 and not node.collector.rejected
    await store.close()
