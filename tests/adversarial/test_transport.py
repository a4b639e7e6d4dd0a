"""THREATS.md 12-15 against a real mosquitto with TLS, client certificates and the ACL: unknown
CAs and downgrades, cross-vehicle topics, outages mid-job, floods and oversized messages."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time

import aiomqtt
import pytest

from agent.kit.mqtt import NO_DELAY, client_tls
from agent.wire.topics import Channel, topic
from broker.local import LocalMosquitto, free_port
from broker.provision import FleetPki, ProvisionError, provision
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


@pytest.fixture
def pki(tmp_path) -> FleetPki:
    return provision(tmp_path / "pki", ["veh-a", "veh-b"])


@pytest.fixture
def secure_broker(tmp_path, pki):
    broker = LocalMosquitto(tmp_path / "mq", pki=pki)
    broker.start()
    yield broker
    broker.stop()


def _tls(pki: FleetPki, who: str) -> ssl.SSLContext:
    identity = pki.fleet if who == "fleet" else pki.vehicle(who)
    return client_tls(pki.ca, identity.cert, identity.key)


def _secure_vehicle(tmp_path, vid, port, fleet, pki: FleetPki, ca=None):
    files = write_vehicle(tmp_path, vid, port=port, fleet=fleet, pki=pki)
    if ca is not None:
        text = files.config_path.read_text()
        assert f'ca_file = "{pki.ca}"' in text
        files.config_path.write_text(text.replace(f'ca_file = "{pki.ca}"', f'ca_file = "{ca}"'))
    return files


@pytest.mark.parametrize("vid", ["", "+", "#", "veh/a", "a+b", "fleet-dispatcher", "fleet-x"])
def test_provisioning_refuses_ids_that_could_break_the_acl(tmp_path, vid):
    """Ids with wildcards, separators, nothing, or a fleet tool's prefix are refused, and nothing
    is written for a refused run."""
    with pytest.raises(ProvisionError):
        provision(tmp_path / "pki", ["veh-ok", vid])
    assert not (tmp_path / "pki").exists()


def test_provisioning_refuses_to_overwrite(tmp_path):
    """A vehicle provisioned twice keeps its first certificate."""
    pki = provision(tmp_path / "pki", ["veh-a"])
    before = pki.vehicle("veh-a").cert.read_bytes()
    with pytest.raises(ProvisionError, match="already exists"):
        provision(tmp_path / "pki", ["veh-a"])
    assert pki.vehicle("veh-a").cert.read_bytes() == before
    assert oct(pki.vehicle("veh-a").key.stat().st_mode & 0o777) == "0o600"


async def test_job_and_result_over_mutual_tls(secure_broker, pki, fleet, tmp_path):
    """Over TLS with client certificates, a signed job reaches the agent and its result comes back."""
    files = _secure_vehicle(tmp_path, "veh-a", secure_broker.port, fleet, pki)
    results: list[bytes] = []
    async with aiomqtt.Client(
        "localhost", secure_broker.port, tls_context=_tls(pki, "fleet"), socket_options=NO_DELAY
    ) as client:
        await client.subscribe(topic("veh-a", Channel.RESULTS), qos=1)

        async def pump() -> None:
            async for m in client.messages:
                results.append(m.payload)  # type: ignore[arg-type]

        pumper = asyncio.create_task(pump())
        try:
            async with running_agent(files):
                await client.publish(
                    topic("veh-a", Channel.JOBS),
                    signed(job_spec(fleet, "veh-a"), fleet.job_key),
                    qos=1,
                )
                await wait_for(lambda: results, what="result over TLS")
        finally:
            pumper.cancel()


# paho-mqtt leaves the socket of a failed TLS handshake to the garbage collector, which
# closes it (a ResourceWarning, not a leak); noted for an upstream report.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_agent_refuses_a_broker_it_cannot_verify(secure_broker, pki, fleet, tmp_path):
    """An agent trusting another CA never connects (certificate verify failed); no plaintext try."""
    other = provision(tmp_path / "other-pki", [])
    files = _secure_vehicle(tmp_path, "veh-a", secure_broker.port, fleet, pki, ca=other.ca)
    async with running_agent_unconnected(files) as agent:
        await wait_for(lambda: agent.counts["reconnects"] >= 1, what="a failed attempt")
        assert not agent.status()["connected"]


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_plaintext_client_gets_nothing_from_the_tls_broker(secure_broker):
    """The secure broker has no plaintext listener: a plaintext client cannot even connect."""
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", secure_broker.port, timeout=3):
            pass


async def test_acl_confines_a_vehicle_to_its_own_topics(secure_broker, pki):
    """veh-a receives nothing published on veh-b's jobs and cannot write veh-b's results; its
    own jobs reach it and its own results reach the fleet."""
    fleet_got: list[str] = []
    a_got: list[str] = []

    def connect(who: str) -> aiomqtt.Client:
        return aiomqtt.Client(
            "localhost",
            secure_broker.port,
            tls_context=_tls(pki, who),
            protocol=aiomqtt.ProtocolVersion.V5,
        )

    async def pump(client: aiomqtt.Client, into: list[str]) -> None:
        async for m in client.messages:
            into.append(m.topic.value)

    async with connect("fleet") as fleet_client, connect("veh-a") as a:
        await fleet_client.subscribe("fleet/v1/vehicles/+/results", qos=1)
        await a.subscribe(topic("veh-b", Channel.JOBS), qos=1)
        await a.subscribe(topic("veh-a", Channel.JOBS), qos=1)
        pumps = [
            asyncio.create_task(pump(fleet_client, fleet_got)),
            asyncio.create_task(pump(a, a_got)),
        ]
        try:
            await fleet_client.publish(topic("veh-b", Channel.JOBS), b"for b only", qos=1)
            await fleet_client.publish(topic("veh-a", Channel.JOBS), b"for a", qos=1)
            await a.publish(topic("veh-b", Channel.RESULTS), b"forged", qos=1)
            await a.publish(topic("veh-a", Channel.RESULTS), b"mine", qos=1)
            await wait_for(lambda: a_got and fleet_got, what="the allowed messages")
            await asyncio.sleep(0.3)
        finally:
            for p in pumps:
                p.cancel()
    assert a_got == [topic("veh-a", Channel.JOBS)]
    assert fleet_got == [topic("veh-a", Channel.RESULTS)]


@contextlib.asynccontextmanager
async def running_agent_unconnected(files):
    """An agent that is expected never to connect."""
    from agent.assembly import build_agent
    from agent.config import load_config

    agent = build_agent(load_config(files.config_path))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


def test_unusable_tls_files_stop_the_agent_at_start(tmp_path, fleet, pki):
    """A CA file that is missing is a start-up error naming the files, not a crash later."""
    from agent.assembly import StartupError, build_agent
    from agent.config import load_config

    files = _secure_vehicle(tmp_path, "veh-a", 8883, fleet, pki, ca=tmp_path / "missing-ca.pem")
    with pytest.raises(StartupError, match=r"broker TLS files .*missing-ca\.pem"):
        build_agent(load_config(files.config_path))


# ---- added for the adversarial suite: downgrade, flood, oversize, outage over TLS ----------


def test_a_config_cannot_downgrade_a_remote_broker_to_plaintext(tmp_path, fleet):
    """tls = false is accepted only for a loopback test broker; for any other host the config is
    refused with the reason, so the agent never speaks plaintext to the network."""
    from agent.config import ConfigError, load_config

    files = write_vehicle(tmp_path, "veh-a", port=1883, fleet=fleet)
    text = files.config_path.read_text().replace('host = "127.0.0.1"', 'host = "broker.example"')
    files.config_path.write_text(text)
    with pytest.raises(ConfigError, match="tls"):
        load_config(files.config_path)


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_tls_agent_never_talks_plaintext_to_a_plaintext_broker(
    mosquitto, pki, fleet, tmp_path
):
    """Pointed at a plaintext listener, the TLS agent fails its handshake and keeps retrying with
    TLS: it never connects, and nothing it sends is readable there."""
    files = write_vehicle(tmp_path, "veh-a", port=mosquitto.port, fleet=fleet, pki=pki)
    text = files.config_path.read_text().replace('host = "localhost"', 'host = "127.0.0.1"')
    files.config_path.write_text(text.replace(f'ca_file = "{pki.ca}"', f'ca_file = "{pki.ca}"'))
    seen: list[str] = []
    async with observing(mosquitto.port, "veh-a") as obs:
        async with running_agent_unconnected(files) as agent:
            await wait_for(lambda: agent.counts["reconnects"] >= 2, what="two failed attempts")
            assert not agent.status()["connected"]
        seen = [e["kind"] for e in obs.events] + [str(w) for w in obs.work]
    assert seen == []


async def test_a_flood_of_jobs_is_bounded_and_every_job_answered(
    secure_broker, pki, fleet, tmp_path
):
    """60 valid jobs at once to a vehicle with 4 slots: the agent never holds more than its queue
    bounds; every job is run, handed back `busy`, or (when the inbound queue is full) dropped
    and counted -- none vanishes uncounted; the agent then serves an honest job."""
    files = write_vehicle(
        tmp_path,
        "veh-a",
        port=secure_broker.port,
        fleet=fleet,
        pki=pki,
        extra=f"metrics_port = {free_port()}",  # the drop counter is checked too
    )
    ids = [f"flood-{i:02d}" for i in range(60)]
    async with observing(secure_broker.port, "veh-a", pki) as obs, running_agent(files) as agent:
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, agent.status()["queued_jobs"])
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        for job_id in ids:
            spec = burn_spec(fleet, "veh-a", rows=5000, job_id=job_id)
            await obs.send_job(signed(spec, fleet.job_key))

        def answered() -> list[str]:
            return [j for j in ids if {"succeeded", "released"} & set(obs.kinds(j))]

        await wait_for(
            lambda: len(answered()) + agent.counts["inbound_dropped"] == len(ids),
            timeout=30,
            what="every job run, handed back, or counted as dropped",
        )
        watcher.cancel()
        busy = [e for e in obs.events if e["kind"] == "released"]
        assert all(e["reason"] == "busy" for e in busy)
        assert peak <= agent.config.agent.capacity
        succeeded = [j for j in ids if "succeeded" in obs.kinds(j)]
        assert len(obs.results) == len(succeeded)
        assert agent.counts["released:busy"] == len(busy) > 0
        registry = agent.metrics.registry
        assert registry is not None
        dropped = registry.get_sample_value("edge_agent_inbound_dropped_total")
        assert dropped == agent.counts["inbound_dropped"]
        await obs.send_job(signed(job_spec(fleet, "veh-a", job_id="job-after"), fleet.job_key))
        await wait_for(lambda: "succeeded" in obs.kinds("job-after"), what="served after")


async def test_an_oversized_message_never_reaches_the_agent(secure_broker, pki, fleet, tmp_path):
    """A 3 MB message towards a car that announced a smaller Maximum Packet Size (MQTT 5) is
    never buffered by the agent, whatever the broker does with it. Mosquitto drops it; a broker
    that forwards it anyway (ejabberd 23.01 does) meets the agent's own guard, which hangs up
    before reading the body and reconnects (tests/adversarial/test_hostile_broker.py pins
    that path). Either way, nothing is parsed and the next job is served."""
    files = write_vehicle(tmp_path, "veh-a", port=secure_broker.port, fleet=fleet, pki=pki)
    async with observing(secure_broker.port, "veh-a", pki) as obs, running_agent(files) as agent:
        await obs.send_job(b"{" + b" " * (3 * 1024 * 1024) + b"}")
        await obs.send_job(signed(job_spec(fleet, "veh-a", job_id="job-after"), fleet.job_key))
        await wait_for(lambda: "succeeded" in obs.kinds("job-after"), what="next job served")
        assert agent.counts["rejected"] == 0, "the big message was never read to be rejected"
        # Dropped by the broker (no reconnect), or refused by the guard (counted, reconnected).
        assert agent.counts["reconnects"] == agent.counts["oversized_packets"]


@pytest.mark.timeout(120)
async def test_a_broker_outage_mid_job_loses_no_result(pki, fleet, tmp_path):
    """The TLS broker goes away while a job runs and comes back on the same port: the result waits
    in the outbox, is delivered once the agent reconnects, and the job ends with exactly one
    result at the collector. (If the agent's reconnect beats the collector's, the restarted
    broker, without persistence, has nobody to deliver that copy to: the lease expires and the
    job runs again. Either way, one result.)"""
    from broker.collector import Collector
    from broker.fleet import FleetNode
    from broker.store.jobs import JobTemplate
    from broker.store.sqlite import JobQueue, SqliteStore

    broker = LocalMosquitto(tmp_path / "mq1", pki=pki)
    broker.start()
    port = broker.port
    files = write_vehicle(tmp_path, "veh-a", port=port, fleet=fleet, pki=pki)
    queue = JobQueue(tmp_path / "fleet.db", lease_s=5.0)
    collector = Collector(
        vehicles={"veh-a": files.key.public_key()},
        requester_key=fleet.requester,
        digest_for=queue.assignment_digest,
    )
    node = FleetNode(
        host="localhost",
        port=port,
        store=SqliteStore(queue),
        signing_key=fleet.job_key,
        collector=collector,
        tls=_tls(pki, "fleet"),
        lease_tick_s=0.2,
    )
    spec = burn_spec(fleet, "veh-a", rows=60_000)
    job_id = queue.submit(
        JobTemplate(
            job_class=spec.job_class,
            model=spec.model,
            inputs=spec.inputs,
            limits=spec.limits,
            requester_key=spec.requester_key,
            lifetime_s=600,
        ),
        now=time.time(),
    )
    fleet_task = asyncio.create_task(node.run())
    restarted = None
    try:
        async with running_agent(files) as agent:
            await wait_for(
                lambda: agent.status()["current_job"] is not None, timeout=20, what="job running"
            )
            broker.stop()
            await wait_for(lambda: not agent.status()["connected"], what="agent sees the outage")
            await wait_for(
                lambda: agent.status()["outbox"] == 1, timeout=30, what="result in outbox"
            )
            restarted = LocalMosquitto(tmp_path / "mq2", port=port, pki=pki)
            restarted.start()
            await wait_for(lambda: job_id in collector.results, timeout=60, what="result delivered")
            await wait_for(lambda: agent.status()["outbox"] == 0, what="outbox drained")
        assert list(collector.results) == [job_id]
        assert collector.duplicates == 0
    finally:
        fleet_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fleet_task
        queue.close()
        if restarted is not None:
            restarted.stop()
        broker.stop()
