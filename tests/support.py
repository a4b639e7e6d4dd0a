"""Test harness: real keys, real config files, a real agent in-process, a real MQTT observer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.assembly import build_agent
from agent.config import load_config
from agent.daemon import Agent
from agent.kit.exitcodes import ExitCode
from agent.kit.keyfiles import write_private_key
from agent.kit.mqtt import NO_DELAY, client_tls
from agent.wire import envelope
from agent.wire.codec import dump_model
from agent.wire.keys import KeyRing, key_id, raw_public
from agent.wire.messages import JobSpec, Limits, ModelRef
from agent.wire.tensors import Tensor
from agent.wire.topics import Channel, topic
from broker.agent_config import agent_toml
from broker.policy import make_policy, signed_policy
from broker.provision import FleetPki

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
SCENARIOS = REPO / "agent" / "vehicle" / "scenarios"
MANIFEST = json.loads((MODELS / "manifest.json").read_text())
DIGITS = next(m for m in MANIFEST["models"] if m["name"] == "digits")
DIGITS_REF = ModelRef(name="digits", sha256=DIGITS["sha256"], size=DIGITS["size"])


def holdout() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(MODELS / "digits_holdout.npz")
    return data["x"], data["y"]


@dataclass
class FleetKeys:
    job_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    requester: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    root: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    @property
    def issuer(self) -> str:
        return key_id(self.job_key.public_key())

    def policy(self, version: int = 1, **kw: Any) -> bytes:
        """A trust policy signed by the root: the job key delegated, the requester named."""
        fields: dict[str, Any] = dict(
            version=version,
            roots=[self.root.public_key()],
            threshold=1,
            job_keys=[self.job_key.public_key()],
            requesters=[self.requester.public_key()],
            valid_s=86_400.0,
        )
        signers = kw.pop("signers", [self.root])
        fields.update(kw)
        return signed_policy(make_policy(**fields), signers)


@dataclass
class VehicleFiles:
    vehicle_id: str
    config_path: Path
    key: Ed25519PrivateKey


def write_vehicle(
    tmp: Path,
    vehicle_id: str,
    *,
    port: int,
    fleet: FleetKeys,
    scenario: str = "parked-charging",
    opted_in: bool = True,
    extra: str = "",
    hold_s: float = 0.0,
    scenario_path: Path | None = None,
    owner: str = "",
    vehicle: str = "",
    limits: str = "",
    trust: str = "policy",
    pki: FleetPki | None = None,
) -> VehicleFiles:
    """Write a vehicle's key, its trust anchor and config under `tmp`.

    trust="policy": a root-signed trust policy (as on a vehicle); "keys": a fixed key list.
    With `pki` (from `edge-fleet provision`, naming this vehicle) the agent uses mutual TLS.
    """
    d = tmp / vehicle_id
    d.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    write_private_key(d / "vehicle.key", key)
    (d / "trusted-job-keys.json").write_bytes(KeyRing.of(fleet.job_key.public_key()).to_file())
    (d / "trust-policy.json").write_bytes(fleet.policy())
    owner_settings: dict[str, object] = {"opted_in": opted_in}
    if not opted_in:
        owner_settings |= {"consent_version": None, "consent_date": None}
    (d / "agent.toml").write_text(
        agent_toml(
            vehicle_id,
            port=port,
            pki=pki,
            scenario=scenario_path or SCENARIOS / (scenario + ".toml"),
            models=MODELS,
            trust=trust,
            settings={
                "owner": owner_settings,
                "limits": {"gate_hold_s": hold_s},
                # Every event on the wire: the tests watch jobs through them (the lean path,
                # the default, is tested on its own in tests/test_lean_path.py).
                "agent": {
                    "capacity": 4,
                    "work_request_interval_s": 0.3,
                    "vehicle_poll_s": 0.02,
                    "job_events": "all",
                },
            },
            raw={"owner": owner, "vehicle": vehicle, "limits": limits, "agent": extra},
        )
    )
    return VehicleFiles(vehicle_id, d / "agent.toml", key)


def fleet_client(port: int, pki: FleetPki | None = None, **kw: Any) -> aiomqtt.Client:
    """An MQTT v5 client as the fleet's tools connect: mutual TLS with `pki`, else plaintext."""
    if pki is None:
        return aiomqtt.Client(
            "127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5, socket_options=NO_DELAY, **kw
        )
    return aiomqtt.Client(
        "localhost",
        port,
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=NO_DELAY,
        tls_context=client_tls(pki.ca, pki.fleet.cert, pki.fleet.key),
        **kw,
    )


@contextlib.asynccontextmanager
async def running_agent(files: VehicleFiles) -> AsyncIterator[Agent]:
    """A real Agent serving in this event loop until the block ends."""
    agent = build_agent(load_config(files.config_path))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop), name=f"agent-{files.vehicle_id}")
    try:
        await wait_for(lambda: agent.status()["connected"], what="agent connected")
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


async def wait_for(predicate, *, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def job_spec(
    fleet: FleetKeys,
    vehicle_id: str,
    *,
    job_id: str = "job-1",
    x: np.ndarray | None = None,
    model: ModelRef = DIGITS_REF,
    issued_at: float | None = None,
    lifetime_s: float = 60.0,
    **overrides: object,
) -> JobSpec:
    now = time.time() if issued_at is None else issued_at
    if x is None:
        x = holdout()[0][:1]
    fields: dict[str, object] = dict(
        job_id=job_id,
        attempt=1,
        issuer=fleet.issuer,
        issued_at=now,
        expires_at=now + lifetime_s,
        vehicle_id=vehicle_id,
        job_class="digits-eval",
        model=model,
        inputs={"X": Tensor.from_numpy(np.asarray(x, dtype=np.float32))},
        limits=Limits(max_runtime_s=10.0),
        requester_key=raw_public(fleet.requester.public_key()),
    )
    fields.update(overrides)
    return JobSpec(**fields)  # type: ignore[arg-type]


def signed(spec: JobSpec, key: Ed25519PrivateKey) -> bytes:
    return envelope.sign(envelope.JOB_TYPE, dump_model(spec), key)


class Observer:
    """A plain MQTT client that records one vehicle's events and results."""

    def __init__(self, client: aiomqtt.Client, vehicle_id: str) -> None:
        self.client = client
        self.vehicle_id = vehicle_id
        self.events: list[dict] = []
        self.results: list[bytes] = []
        self.work: list[dict] = []

    async def send_job(self, raw: bytes) -> None:
        await self.client.publish(topic(self.vehicle_id, Channel.JOBS), raw, qos=1)

    def kinds(self, job_id: str | None = "job-1") -> list[str]:
        return [e["kind"] for e in self.events if e.get("job_id") == job_id]

    async def pump(self) -> None:
        async for m in self.client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else b""
            channel = m.topic.value.rsplit("/", 1)[1]
            if channel == "events":
                self.events.append(json.loads(payload))
            elif channel == "results":
                self.results.append(payload)
            elif channel == "work":
                self.work.append(json.loads(payload))


@contextlib.asynccontextmanager
async def observing(
    port: int, vehicle_id: str, pki: FleetPki | None = None
) -> AsyncIterator[Observer]:
    async with fleet_client(port, pki) as client:
        for ch in (Channel.EVENTS, Channel.RESULTS, Channel.WORK):
            await client.subscribe(topic(vehicle_id, ch), qos=1)
        obs = Observer(client, vehicle_id)
        pump = asyncio.create_task(obs.pump(), name="observer")
        try:
            yield obs
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump


BURN = next(m for m in MANIFEST["models"] if m["name"] == "burn")
BURN_REF = ModelRef(name="burn", sha256=BURN["sha256"], size=BURN["size"])


def burn_spec(
    fleet: FleetKeys,
    vehicle_id: str,
    *,
    rows: int,
    job_id: str = "job-1",
    max_runtime_s: float = 60.0,
    **overrides: object,
) -> JobSpec:
    """A job on the compute-bound model: about 40 us of one core per row."""
    inputs = {
        "x": Tensor.from_numpy(np.ones((1, 256), np.float32)),
        "rows_by_256": Tensor.from_numpy(np.array([rows, 256], np.int64)),
    }
    return job_spec(
        fleet,
        vehicle_id,
        job_id=job_id,
        model=BURN_REF,
        inputs=inputs,
        limits=Limits(max_runtime_s=max_runtime_s),
        **overrides,
    )


def refused_at_start(config_path: Path) -> str:
    """Run `edge-agent run` on a config it must refuse: asserts it exits 78 (EX_CONFIG, so
    systemd does not restart-loop) and returns what it printed about why."""
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == ExitCode.CONFIG, proc.stdout + proc.stderr
    return proc.stdout
