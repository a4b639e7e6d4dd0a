"""The fleet node: the dispatcher and the collector on one MQTT connection.

It answers each vehicle's work requests on that vehicle's own jobs topic with
jobs bound to it and signed by the fleet's job-signing key, returns jobs to the
queue when a vehicle hands them back or goes offline or a lease runs out, and
feeds results to the collector. It trusts nothing a vehicle says beyond that
vehicle's own jobs: every message is parsed strictly and checked against the
topic it came on.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import Counter, defaultdict
from collections.abc import Callable

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.kit.backoff import ReconnectBackoff
from agent.kit.logs import get_logger
from agent.kit.mqtt import NO_DELAY, publish_acked
from agent.wire import envelope
from agent.wire.bundle import sign_job_bundle
from agent.wire.codec import dump_model, parse_model
from agent.wire.errors import Reason, WireError
from agent.wire.keys import key_id
from agent.wire.messages import EventKind, JobEvent, JobSpec, VehicleStatus, WorkRequest
from agent.wire.topics import Channel, all_vehicles, parse_topic, topic
from broker.collector import Collected, Collector
from broker.queue import JobQueue, Lease, counts_as_failure

MAX_MESSAGE_BYTES = 64 * 1024
_HAND_BACK = {EventKind.RELEASED, EventKind.PREEMPTED, EventKind.REJECTED, EventKind.FAILED}
_STILL_HELD = {EventKind.ACCEPTED, EventKind.RUNNING, EventKind.HEARTBEAT}


class FleetNode:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        queue: JobQueue,
        signing_key: Ed25519PrivateKey,
        collector: Collector,
        clock: Callable[[], float] = time.time,
        lease_tick_s: float = 1.0,
        on_result: Callable[[Collected], None] | None = None,
        tls: ssl.SSLContext | None = None,
        bundle_from_bytes: int = 64 * 1024,
    ) -> None:
        self._tls = tls
        self._bundle_from_bytes = bundle_from_bytes  # jobs with this much input go as bundles
        self.host, self.port = host, port
        self.queue = queue
        self.collector = collector
        self._key = signing_key
        self._issuer = key_id(signing_key.public_key())
        self._clock = clock
        self._lease_tick_s = lease_tick_s
        self._on_result = on_result
        self._log = get_logger(component="fleet")
        self.ready = asyncio.Event()
        self.online: dict[str, bool] = {}
        self.status: dict[str, VehicleStatus] = {}
        self.events: dict[str, Counter[str]] = defaultdict(Counter)
        self.work_requests: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.reconnects = 0

    async def run(self) -> None:
        """Serve until cancelled, reconnecting (capped backoff, full jitter) when the broker goes."""
        backoff = ReconnectBackoff(base_s=0.2, cap_s=5.0, healthy_after_s=30.0)
        while True:
            try:
                async with aiomqtt.Client(
                    self.host,
                    self.port,
                    identifier=f"fleet-{self._issuer}",
                    protocol=aiomqtt.ProtocolVersion.V5,
                    max_queued_incoming_messages=10_000,
                    socket_options=NO_DELAY,
                    tls_context=self._tls,
                ) as client:
                    # One SUBSCRIBE for all four: a result published the moment this connection
                    # is back is not missed between separate subscriptions.
                    await client.subscribe(
                        [
                            (all_vehicles(channel), 1)
                            for channel in (
                                Channel.RESULTS,
                                Channel.EVENTS,
                                Channel.STATUS,
                                Channel.WORK,
                            )
                        ]
                    )
                    self.ready.set()
                    backoff.connected(time.monotonic())
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._receive(client), name="fleet-receiver")
                        tg.create_task(self._expire_leases(), name="lease-expiry")
            except* aiomqtt.MqttError as group:
                self.ready.clear()
                self.reconnects += 1
                self._log.warning("fleet_disconnected", reason=str(group.exceptions[0]))
            await asyncio.sleep(backoff.next_delay(time.monotonic()))

    async def _expire_leases(self) -> None:
        while True:
            await asyncio.sleep(self._lease_tick_s)
            n = self.queue.expire_leases(self._clock())
            if n:
                self._log.info("leases_expired", count=n)

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            where = parse_topic(message.topic.value)
            payload = message.payload
            if where is None or not isinstance(payload, bytes):
                continue
            vehicle_id, channel = where
            try:
                await self._dispatch(client, vehicle_id, channel, payload)
            except WireError as err:
                self.refused[f"{channel.value}:{err.reason.value}"] += 1
                self._log.warning(
                    "message_refused",
                    vehicle_id=vehicle_id,
                    channel=channel.value,
                    reason=err.reason.value,
                    detail=err.detail,
                )

    async def _dispatch(
        self, client: aiomqtt.Client, vehicle_id: str, channel: Channel, payload: bytes
    ) -> None:
        if len(payload) > MAX_MESSAGE_BYTES and channel is not Channel.RESULTS:
            raise WireError(Reason.OVERSIZED, f"{len(payload)} bytes on {channel}")
        if channel is Channel.WORK:
            await self._on_work(client, vehicle_id, payload)
        elif channel is Channel.EVENTS:
            self._on_event(vehicle_id, payload)
        elif channel is Channel.STATUS:
            self._on_status(vehicle_id, payload)
        elif channel is Channel.RESULTS:
            self._on_result_message(vehicle_id, payload)

    async def _on_work(self, client: aiomqtt.Client, vehicle_id: str, raw: bytes) -> None:
        request = parse_model(
            raw, WorkRequest, what="work request", reason=Reason.MALFORMED_PAYLOAD
        )
        if request.vehicle_id != vehicle_id:
            raise WireError(Reason.WRONG_VEHICLE, f"request names {request.vehicle_id}")
        self.work_requests[vehicle_id] += 1
        now = self._clock()
        leases = self.queue.lease(
            vehicle_id, request.capacity, {m.sha256 for m in request.models}, now
        )
        for lease in leases:
            signed, digest = self.sign_job(lease, vehicle_id, now)
            self.queue.record_assignment(lease.job_id, lease.attempt, vehicle_id, digest, now)
            await publish_acked(client, topic(vehicle_id, Channel.JOBS), signed)
        if leases:
            self._log.info("jobs_assigned", vehicle_id=vehicle_id, count=len(leases))

    def sign_job(self, lease: Lease, vehicle_id: str, now: float) -> tuple[bytes, str]:
        t = lease.template
        spec = JobSpec(
            job_id=lease.job_id,
            attempt=lease.attempt,
            issuer=self._issuer,
            issued_at=now,
            expires_at=min(now + t.lifetime_s, lease.expires_at),
            vehicle_id=vehicle_id,
            job_class=t.job_class,
            model=t.model,
            inputs=t.inputs,
            limits=t.limits,
            requester_key=t.requester_key,
        )
        if sum(t.nbytes for t in spec.inputs.values()) >= self._bundle_from_bytes:
            return sign_job_bundle(spec, self._key)  # raw tensors: no base64, no JSON pass
        payload = dump_model(spec)
        return (
            envelope.sign(envelope.JOB_TYPE, payload, self._key),
            envelope.digest_of(envelope.JOB_TYPE, payload),
        )

    def _on_event(self, vehicle_id: str, raw: bytes) -> None:
        event = parse_model(raw, JobEvent, what="job event", reason=Reason.MALFORMED_PAYLOAD)
        if event.vehicle_id != vehicle_id:
            raise WireError(Reason.WRONG_VEHICLE, f"event names {event.vehicle_id}")
        self.events[vehicle_id][event.kind.value] += 1
        if event.kind in _STILL_HELD and event.job_id is not None and event.attempt is not None:
            self.queue.extend_lease(event.job_id, event.attempt, vehicle_id, self._clock())
        if event.kind in _HAND_BACK and event.job_id is not None and event.attempt is not None:
            reason = event.reason or event.kind.value
            self.queue.hand_back(
                event.job_id,
                event.attempt,
                vehicle_id,
                reason,
                self._clock(),
                failure=counts_as_failure(event.kind.value, reason),
            )

    def _on_status(self, vehicle_id: str, raw: bytes) -> None:
        if not raw:  # a cleared retained message
            return
        status = parse_model(raw, VehicleStatus, what="status", reason=Reason.MALFORMED_PAYLOAD)
        if status.vehicle_id != vehicle_id:
            raise WireError(Reason.WRONG_VEHICLE, f"status names {status.vehicle_id}")
        self.status[vehicle_id] = status
        was_online = self.online.get(vehicle_id)
        self.online[vehicle_id] = status.online
        if not status.online and was_online is not False:
            n = self.queue.vehicle_offline(vehicle_id, self._clock())
            self._log.info("vehicle_offline", vehicle_id=vehicle_id, requeued=n)

    def _on_result_message(self, vehicle_id: str, raw: bytes) -> None:
        collected = self.collector.accept(vehicle_id, raw)
        if not collected.duplicate:
            self.queue.complete(collected.body.job_id, self._clock())
        if self._on_result is not None:
            self._on_result(collected)
