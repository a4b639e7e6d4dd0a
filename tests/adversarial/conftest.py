"""The adversarial suite's rig: a real mosquitto with TLS, client certificates and the ACL, real
agents configured as on a vehicle (mutual TLS, a root-signed trust policy), and a fleet-side
observer connected with the fleet tools' certificate."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.daemon import Agent
from broker.local import LocalMosquitto
from broker.provision import FleetPki, provision
from tests.support import (
    FleetKeys,
    Observer,
    VehicleFiles,
    job_spec,
    observing,
    running_agent,
    signed,
    wait_for,
    write_vehicle,
)

VID = "veh-adv"
OTHER = "veh-other"

pytestmark = pytest.mark.broker


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> FleetPki:
    return provision(tmp_path_factory.mktemp("pki") / "pki", [VID, OTHER])


@pytest.fixture(scope="session")
def secure_broker(
    tmp_path_factory: pytest.TempPathFactory, pki: FleetPki
) -> Iterator[LocalMosquitto]:
    broker = LocalMosquitto(tmp_path_factory.mktemp("secure-mq"), pki=pki)
    broker.start()
    yield broker
    broker.stop()


@dataclass
class Rig:
    port: int
    pki: FleetPki
    fleet: FleetKeys
    tmp: Path

    def vehicle(self, vehicle_id: str = VID, **kw: Any) -> VehicleFiles:
        return write_vehicle(
            self.tmp, vehicle_id, port=self.port, fleet=self.fleet, pki=self.pki, **kw
        )

    def observe(self, vehicle_id: str = VID) -> contextlib.AbstractAsyncContextManager[Observer]:
        return observing(self.port, vehicle_id, self.pki)

    @contextlib.asynccontextmanager
    async def serving(self, files: VehicleFiles) -> AsyncIterator[tuple[Observer, Agent]]:
        async with self.observe(files.vehicle_id) as obs, running_agent(files) as agent:
            yield obs, agent

    async def still_serves(self, obs: Observer, agent: Agent, job_id: str = "job-honest") -> None:
        """The daemon's next honest job runs and its (one) result is published."""
        before, ran = len(obs.results), agent.counts["running"]
        await obs.send_job(
            signed(job_spec(self.fleet, obs.vehicle_id, job_id=job_id), self.fleet.job_key)
        )
        await wait_for(lambda: "succeeded" in obs.kinds(job_id), what=f"honest {job_id} served")
        await wait_for(lambda: len(obs.results) == before + 1, what="its result")
        assert agent.counts["running"] == ran + 1


@pytest.fixture
def rig(secure_broker: LocalMosquitto, pki: FleetPki, fleet: FleetKeys, tmp_path: Path) -> Rig:
    return Rig(secure_broker.port, pki, fleet, tmp_path)


@pytest.fixture
def private_rig(pki: FleetPki, fleet: FleetKeys, tmp_path: Path) -> Iterator[Rig]:
    """A rig with its own secure broker, for tests that leave retained messages behind."""
    broker = LocalMosquitto(tmp_path / "private-mq", pki=pki)
    broker.start()
    yield Rig(broker.port, pki, fleet, tmp_path)
    broker.stop()


async def publish_policy_as(rig: Rig, raw: bytes, who: str = "fleet") -> None:
    """Publish `raw` retained on the policy topic with the fleet's (or a vehicle's) certificate."""
    from agent.kit.mqtt import client_tls
    from broker.policy import publish_policy

    identity = rig.pki.fleet if who == "fleet" else rig.pki.vehicle(who)
    await publish_policy(
        raw,
        host="localhost",
        port=rig.port,
        tls=client_tls(rig.pki.ca, identity.cert, identity.key),
    )
