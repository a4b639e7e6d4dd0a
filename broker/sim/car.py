"""One simulated car: its connection, its gate, its jobs (see broker/sim/__init__.py)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.core.gate import Gate, GatePolicy
from agent.kit.mqtt import NO_DELAY, forget_stale_cancellations, publish_acked
from agent.vehicle.emulated import EmulatedVehicle
from agent.vehicle.scenario import Scenario
from agent.wire import envelope
from agent.wire.bundle import encode_result_body, sign_result
from agent.wire.codec import dump_model, parse_model
from agent.wire.errors import Reason, WireError
from agent.wire.hints import HintKind, is_hint, verify_hint
from agent.wire.keys import (
    KeyRing,
    VehicleKey,
    VehicleRegistryFile,
    raw_public,
    sealable_x25519_public,
)
from agent.wire.messages import (
    FOLDED_EVENTS,
    SUITE,
    EventKind,
    JobEvent,
    JobSpec,
    ModelHeld,
    ResultBody,
    SealedResult,
    VehicleStatus,
    WorkRequest,
)
from agent.wire.sealing import result_info, seal
from agent.wire.tensors import Tensor
from agent.wire.topics import Channel, topic

MAX_MESSAGE_BYTES = 1024 * 1024
MAX_QUIET_S = 900.0
GATE_TICK_S = 1.0
PHASES = ("closed", "idle", "working")


def vehicle_key(seed: str, vehicle_id: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(
        hashlib.sha256(f"{seed}/{vehicle_id}".encode()).digest()
    )


def vehicle_ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


def registry(seed: str, ids: list[str]) -> bytes:
    return dump_model(
        VehicleRegistryFile(
            version=1,
            vehicles=tuple(
                VehicleKey(vehicle_id=v, public_key=raw_public(vehicle_key(seed, v).public_key()))
                for v in ids
            ),
        )
    )


@dataclass
class Meter:
    """Messages each way, by what the car was doing; and car-seconds in each state."""

    msgs: Counter[str] = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=dict)
    events: Counter[str] = field(default_factory=Counter)
    connected: int = 0
    connected_peak: int = 0

    def merge(self, other: dict[str, object]) -> None:
        for name in ("msgs", "events"):
            part = other[name]
            assert isinstance(part, dict)
            getattr(self, name).update(part)
        seconds = other["seconds"]
        assert isinstance(seconds, dict)
        for phase, s in seconds.items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + float(s)
        self.connected_peak += int(other["connected_peak"])  # type: ignore[call-overload]

    def as_dict(self) -> dict[str, object]:
        return {
            "msgs": dict(self.msgs),
            "seconds": dict(self.seconds),
            "events": dict(self.events),
            "connected_peak": self.connected_peak,
        }


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    trusted_keys: bytes  # a trusted-keys file: picklable, for the car processes
    seed: str
    compute_s: float
    capacity: int
    time_scale: float
    model: ModelHeld
    work_request_interval_s: float = 2.0
    job_events: str = "lean"  # as the agent's [agent] job_events: "lean" or "all"
    pki: Path | None = None  # each car's own certificate (mutual TLS)
    ca_file: Path | None = None  # or TLS with no client certificate, and a login
    username: str | None = None
    password: str | None = field(default=None, repr=False)


class SimVehicle:
    def __init__(self, vehicle_id: str, settings: Settings, scenario: Scenario, meter: Meter):
        self.id = vehicle_id
        self.s = settings
        self.meter = meter
        self.key = vehicle_key(settings.seed, vehicle_id)
        self.ring = KeyRing.from_file(settings.trusted_keys, "the trusted keys")
        rng = random.Random(vehicle_id)
        day = max((e.at_s for e in scenario.events), default=0.0) + 3600.0
        offset = rng.uniform(0, day) / settings.time_scale
        self.car = EmulatedVehicle(
            scenario, started_at=time.time() - offset, time_scale=settings.time_scale
        )
        self.gate = Gate(GatePolicy(opted_in=True, hold_s=0.0))
        self.gate_open = self.gate.evaluate(self.car.snapshot(time.time())).open
        self.jobs: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.outstanding = 0
        self.quiet_until = 0.0
        self.wake = asyncio.Event()
        self._phase = self.phase
        self._phase_since = time.monotonic()
        self._client: aiomqtt.Client | None = None
        self._request_id = 0

    @property
    def phase(self) -> str:
        return "working" if self.jobs else "idle" if self.gate_open else "closed"

    def _account(self) -> None:
        """Call after the car's state changed: the time since the last call goes to the state
        it was in, and the clock starts for the state it is in now."""
        now = time.monotonic()
        seconds = self.meter.seconds
        seconds[self._phase] = seconds.get(self._phase, 0.0) + now - self._phase_since
        self._phase, self._phase_since = self.phase, now

    def _count(self, direction: str) -> None:
        self.meter.msgs[f"{self.phase}:{direction}"] += 1

    async def _publish(self, name: str, payload: bytes, *, retain: bool = False) -> None:
        assert self._client is not None
        self._count("out")
        await publish_acked(self._client, name, payload, retain=retain)

    def _status(self, online: bool) -> VehicleStatus:
        decision = self.gate.last
        reasons = tuple(r.value for r in decision.reasons) if decision else ()
        return VehicleStatus(
            vehicle_id=self.id,
            online=online,
            gate_open=self.gate_open and online,
            reasons=reasons if online else ("connection_lost",),
            agent_version="simulated",
            at=time.time(),
        )

    def _tls(self) -> ssl.SSLContext | None:
        from agent.kit.mqtt import client_tls

        if self.s.pki is None:
            return client_tls(self.s.ca_file) if self.s.ca_file is not None else None
        from broker.provision import FleetPki

        pki = FleetPki(self.s.pki)
        files = pki.vehicle(self.id)
        return client_tls(pki.ca, files.cert, files.key)

    async def run(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.MaximumPacketSize = MAX_MESSAGE_BYTES
        delay = 0.5
        while True:
            try:
                async with aiomqtt.Client(
                    self.s.host,
                    self.s.port,
                    identifier=f"vehicle-{self.id}",
                    protocol=aiomqtt.ProtocolVersion.V5,
                    will=aiomqtt.Will(
                        topic(self.id, Channel.STATUS),
                        dump_model(self._status(False)),
                        qos=1,
                        retain=True,
                    ),
                    properties=props,
                    keepalive=60,
                    timeout=30,
                    socket_options=NO_DELAY,
                    tls_context=self._tls(),
                    username=self.s.username,
                    password=self.s.password,
                    max_queued_incoming_messages=64,
                ) as client:
                    self._client = client
                    await client.subscribe(topic(self.id, Channel.JOBS), qos=1)
                    self.meter.connected += 1
                    self.meter.connected_peak = max(self.meter.connected_peak, self.meter.connected)
                    delay = 0.5
                    try:
                        await self._publish(
                            topic(self.id, Channel.STATUS),
                            dump_model(self._status(True)),
                            retain=True,
                        )
                        async with asyncio.TaskGroup() as tg:
                            tg.create_task(self._receive(client))
                            tg.create_task(self._ask())
                            tg.create_task(self._watch_gate())
                    finally:
                        self.meter.connected -= 1
            except* aiomqtt.MqttError:
                self.meter.events["reconnects"] += 1
                forget_stale_cancellations()
            finally:
                self._client = None
                for task in self.jobs.values():
                    task.cancel()
                self.jobs.clear()
                self.outstanding = 0
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 30.0)

    async def _watch_gate(self) -> None:
        while True:
            await asyncio.sleep(GATE_TICK_S * random.uniform(0.8, 1.2))
            decision = self.gate.evaluate(self.car.snapshot(time.time()))
            if decision.open == self.gate_open:
                continue
            self.gate_open = decision.open
            self._account()
            self.meter.events["gate_opened" if decision.open else "gate_closed"] += 1
            await self._publish(
                topic(self.id, Channel.STATUS), dump_model(self._status(True)), retain=True
            )
            if not decision.open:
                for (job_id, attempt), task in list(self.jobs.items()):
                    task.cancel()
                    await self._event(job_id, attempt, EventKind.PREEMPTED, "gate_closed")
                    self.jobs.pop((job_id, attempt), None)
                self._account()
            self.wake.set()

    async def _ask(self) -> None:
        while True:
            self.wake.clear()
            free = self.s.capacity - len(self.jobs) - self.outstanding
            if free > 0 and self.gate_open:
                self._request_id += 1
                request = WorkRequest(
                    vehicle_id=self.id,
                    request_id=self._request_id,
                    capacity=free,
                    models=(self.s.model,),
                    sent_at=time.time(),
                )
                self.outstanding += free
                await self._publish(topic(self.id, Channel.WORK), dump_model(request))
            deadline = time.monotonic() + self.s.work_request_interval_s
            while True:
                wait = max(deadline, self.quiet_until) - time.monotonic()
                if wait <= 0:
                    self.outstanding = 0
                    break
                try:
                    async with asyncio.timeout(wait):
                        await self.wake.wait()
                except TimeoutError:
                    continue
                self.quiet_until = 0.0
                break

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes):
                continue
            try:
                if is_hint(payload):
                    self._hinted(payload)
                else:
                    await self._job(payload)
            except WireError as err:
                self.meter.events[f"refused:{err.reason.value}"] += 1
            self._count("in")  # a job counts as work, a 'no work' as idle

    def _hinted(self, raw: bytes) -> None:
        hint = verify_hint(
            raw, trusted=self.ring, vehicle_id=self.id, now=time.time(), max_skew_s=30
        )
        self.meter.events[f"hint:{hint.kind.value}"] += 1
        if hint.kind is HintKind.NO_WORK:
            self.outstanding = 0
            self.quiet_until = time.monotonic() + min(hint.retry_after_s, MAX_QUIET_S)
        else:
            self.wake.set()

    async def _job(self, raw: bytes) -> None:
        verified = envelope.verify(
            raw, payload_type=envelope.JOB_TYPE, trusted=self.ring, max_bytes=MAX_MESSAGE_BYTES
        )
        job = parse_model(verified.payload, JobSpec, what="job", reason=Reason.MALFORMED_PAYLOAD)
        if job.vehicle_id != self.id:
            raise WireError(Reason.WRONG_VEHICLE, f"job names {job.vehicle_id}")
        self.outstanding = max(0, self.outstanding - 1)
        if not self.gate_open or len(self.jobs) >= self.s.capacity:
            reason = "gate_closed" if not self.gate_open else "busy"
            await self._event(job.job_id, job.attempt, EventKind.RELEASED, reason)
            return
        key = (job.job_id, job.attempt)
        self.jobs[key] = asyncio.create_task(self._work(job, verified.digest))
        self._account()

    async def _event(self, job_id: str, attempt: int, kind: EventKind, reason: str | None) -> None:
        event = JobEvent(
            vehicle_id=self.id,
            job_id=job_id,
            attempt=attempt,
            kind=kind,
            reason=reason,
            at=time.time(),
        )
        self.meter.events[f"job:{kind.value}"] += 1
        if self.s.job_events == "lean" and kind in FOLDED_EVENTS:
            return  # recorded on the car only, as the agent's default lean path does
        await self._publish(topic(self.id, Channel.EVENTS), dump_model(event))

    async def _work(self, job: JobSpec, digest: str) -> None:
        key = (job.job_id, job.attempt)
        try:
            await self._event(job.job_id, job.attempt, EventKind.ACCEPTED, None)
            await self._event(job.job_id, job.attempt, EventKind.RUNNING, None)
            started = time.monotonic()
            await asyncio.sleep(self.s.compute_s * random.uniform(0.5, 1.5))
            x = next(iter(job.inputs.values())).to_numpy()
            label = np.array([int(abs(float(x.sum())) * 1000) % 10], dtype=np.int64)
            body = ResultBody(
                job_id=job.job_id,
                attempt=job.attempt,
                vehicle_id=self.id,
                model_sha256=job.model.sha256,
                outputs={"label": Tensor.from_numpy(label)},
                runtime_ms=(time.monotonic() - started) * 1000,
                finished_at=time.time(),
            )
            info = result_info(job.job_id, job.attempt, self.id, digest)
            sealed = SealedResult(
                job_id=job.job_id,
                attempt=job.attempt,
                vehicle_id=self.id,
                job_digest=digest,
                suite=SUITE,
                ciphertext=seal(
                    encode_result_body(body), sealable_x25519_public(job.requester_key), info
                ),
            )
            await self._publish(topic(self.id, Channel.RESULTS), sign_result(sealed, self.key))
            await self._event(job.job_id, job.attempt, EventKind.SUCCEEDED, None)
        except aiomqtt.MqttError:
            self.meter.events["result_lost_with_connection"] += 1  # the lease brings it back
        finally:
            if self.jobs.pop(key, None) is not None:
                self._account()
            self.wake.set()

    def close_books(self) -> None:
        self._account()
