"""The fleet node: the dispatcher and the collector on one MQTT connection.

Several nodes may share one job store (PostgreSQL) and split the vehicles' messages
through an MQTT 5 shared subscription (`$share/<group>/...`): each work request, event
and result goes to one node of the group. Each node also reads every status (not
shared) to see the whole fleet. A node's session is persistent (clean start off, a
session expiry): while it is away the broker keeps what the vehicles send for it, and
hands it over when it is back.

It answers each vehicle's work requests on that vehicle's own jobs topic with
jobs bound to it and signed by the fleet's job-signing key, returns jobs to the
queue when a vehicle hands them back or goes offline or a lease runs out, and
feeds results to the collector. It trusts nothing a vehicle says beyond that
vehicle's own jobs: every message is parsed strictly and checked against the
topic it came on.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections import Counter, defaultdict
from collections.abc import Callable

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.kit.backoff import ReconnectBackoff
from agent.kit.credentials import BrokerLogin
from agent.kit.logs import get_logger
from agent.kit.mqtt import (
    NO_DELAY,
    connection_lost,
    forget_stale_cancellations,
    on_connack,
    permanent_refusal,
    publish_acked,
)
from agent.wire import envelope
from agent.wire.bundle import encode_result_body, sign_job_bundle
from agent.wire.codec import dump_model, parse_model
from agent.wire.errors import Reason, WireError
from agent.wire.hints import HintKind, WorkHint, sign_hint
from agent.wire.keys import key_id
from agent.wire.messages import (
    EventKind,
    JobEvent,
    JobSpec,
    ResultBody,
    VehicleStatus,
    WorkRequest,
)
from agent.wire.topics import Channel, all_vehicles, parse_topic, topic
from broker.collector import Collected, Collector
from broker.metrics import FleetMetrics
from broker.peers import PRESENCE_PREFIX, Peers
from broker.store import JobStore
from broker.store.jobs import Completion, Lease, counts_as_failure

MAX_MESSAGE_BYTES = 64 * 1024
_HAND_BACK = {EventKind.RELEASED, EventKind.PREEMPTED, EventKind.REJECTED, EventKind.FAILED}
# Accepted and running arrive within milliseconds of the lease: only the heartbeat, every
# heartbeat_s for each job a car holds (queued on the car or running), extends a lease.
_STILL_HELD = {EventKind.HEARTBEAT}
_SHARED = (Channel.WORK, Channel.EVENTS, Channel.RESULTS, Channel.STATUS)
HINT_LIFETIME_S = 60.0
QUEUE_GAUGES_EVERY_S = 5.0


SHARED_ID, VIEW_ID = 1, 2


def _subscription_id(n: int) -> Properties:
    props = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
    props.SubscriptionIdentifier = n
    return props


def _subscription_ids(message: aiomqtt.Message) -> list[int]:
    """Which of this node's subscriptions a message came through (MQTT 5); [] if unsaid."""
    ids = getattr(message.properties, "SubscriptionIdentifier", None)
    return list(ids) if isinstance(ids, list) else [] if ids is None else [int(ids)]


def shared(group: str, channel: Channel) -> str:
    """The shared-subscription filter of one channel: one node of `group` gets each message."""
    return f"$share/{group}/{all_vehicles(channel)}"


class FleetNode:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        store: JobStore,
        signing_key: Ed25519PrivateKey,
        collector: Collector,
        clock: Callable[[], float] = time.time,
        lease_tick_s: float = 1.0,
        on_result: Callable[[Collected], None] | None = None,
        tls: ssl.SSLContext | None = None,
        bundle_from_bytes: int = 64 * 1024,
        node: str = "main",
        group: str = "fleet",
        session_expiry_s: int = 0,
        idle_retry_s: float = 900.0,
        wake_tick_s: float = 0.5,
        reap_after_s: float = 10.0,
        metrics: FleetMetrics | None = None,
        login: Callable[[], BrokerLogin | None] = lambda: None,
    ) -> None:
        self._tls = tls
        self._login = login  # read at each connection: a rotated password counts next time
        self.sharing = True  # False on a broker without shared subscriptions (one node only)
        self._bundle_from_bytes = bundle_from_bytes  # jobs with this much input go as bundles
        self.host, self.port = host, port
        self.store = store
        self.collector = collector
        self._key = signing_key
        self._issuer = key_id(signing_key.public_key())
        self._clock = clock
        self._lease_tick_s = lease_tick_s
        self._on_result = on_result
        self.node, self.group = node, group
        self._session_expiry_s = session_expiry_s
        self.idle_retry_s = idle_retry_s  # what a car told "no work" waits before asking again
        self._wake_tick_s = wake_tick_s
        self.metrics = metrics or FleetMetrics(registry=None)
        self._log = get_logger(component="fleet", node=node)
        self.ready = asyncio.Event()
        self.online: dict[str, bool] = {}
        self.status: dict[str, VehicleStatus] = {}
        self.last_seen: dict[str, float] = {}
        self.events: dict[str, Counter[str]] = defaultdict(Counter)
        self.work_requests: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.hints: Counter[str] = Counter()
        self.reconnects = 0
        self.refusal: str | None = None  # the broker's last permanent refusal, until connected
        self.client_id = f"fleet-{self._issuer}-{node}"
        self._connected_client: aiomqtt.Client | None = None
        self.peers = Peers(
            group=group,
            node=node,
            client_id=self.client_id,
            host=host,
            port=port,
            tls=tls,
            reap_after_s=reap_after_s,
            login=login,
        )

    def _client(self) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._session_expiry_s
        login = self._login()
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=login.username if login else None,
            password=login.password if login else None,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=self.peers.will(),
            clean_start=self._session_expiry_s == 0,
            properties=props,
            max_queued_incoming_messages=100_000,
            socket_options=NO_DELAY,
            tls_context=self._tls,
        )
        on_connack(client, self._offered)
        return client

    def _offered(self, props: Properties | None) -> None:
        """What the broker's CONNACK says it supports (MQTT 5 properties, absent = default)."""
        sharing = getattr(props, "SharedSubscriptionAvailable", 1) != 0
        if not sharing and self.sharing:
            self._log.warning(
                "shared_subscriptions_unavailable",
                what="the broker has no shared subscriptions: this node subscribes to all the "
                "vehicles' messages itself. Run ONE fleet node against this broker; a second "
                "would handle every message again",
            )
        self.sharing = sharing
        granted = getattr(props, "SessionExpiryInterval", self._session_expiry_s)
        if granted < self._session_expiry_s:
            self._log.warning(
                "session_expiry_cut",
                asked_s=self._session_expiry_s,
                granted_s=granted,
                what="the broker keeps this node's messages only that long while it is away; "
                "results sent meanwhile are lost to it, and their jobs run again when the "
                "leases run out",
            )

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        if not self.sharing:
            # Every message comes once, with no subscription identifier: statuses are
            # both viewed and acted on (see _receive).
            await client.subscribe(
                [(all_vehicles(channel), 1) for channel in _SHARED] + [(self.peers.filter, 1)]
            )
            return
        # One SUBSCRIBE for all the work: a result published the moment this connection is
        # back is not missed between separate subscriptions. Statuses twice, told apart by
        # subscription identifier: shared (one node acts on a car going offline) and whole
        # (this node's view).
        await client.subscribe(
            [(shared(self.group, channel), 1) for channel in _SHARED],
            properties=_subscription_id(SHARED_ID),
        )
        await client.subscribe(
            [(all_vehicles(Channel.STATUS), 1), (self.peers.filter, 1)],
            properties=_subscription_id(VIEW_ID),
        )

    async def run(self) -> None:
        """Serve until cancelled, reconnecting (capped backoff, full jitter) when the broker goes."""
        backoff = ReconnectBackoff(base_s=0.2, cap_s=5.0, healthy_after_s=30.0)
        while True:
            try:
                async with self._client() as client:
                    self._connected_client = client
                    await self._subscribe(client)
                    await self.peers.announce(client)
                    self.ready.set()
                    self.metrics.connected.set(1)
                    self.refusal = None
                    backoff.connected(time.monotonic())
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._receive(client), name="fleet-receiver")
                        tg.create_task(self._expire_leases(), name="lease-expiry")
                        tg.create_task(self._wake_parked(client), name="parked-waker")
                        tg.create_task(self.peers.reap(), name="peer-reaper")
                        tg.create_task(connection_lost(client), name="connection-watch")
            except* aiomqtt.MqttError as group:
                self.ready.clear()
                self.metrics.connected.set(0)
                self.reconnects += 1
                exc = group.exceptions[0]
                refusal = permanent_refusal(exc)
                if refusal is not None:
                    self.refusal = refusal
                    self.metrics.broker_refusals.labels(reason=refusal).inc()
                    self._log.error(
                        "refused_by_broker",
                        reason=refusal,
                        what="fix the login, the client id or the broker's ACL; retrying at "
                        "the backoff's cap",
                    )
                    backoff.refused()
                else:
                    self._log.warning("fleet_disconnected", reason=str(exc))
            forget_stale_cancellations()
            await asyncio.sleep(backoff.next_delay(time.monotonic()))

    async def say_goodbye(self) -> None:
        """Before a clean stop: tell the peers this node is gone. A clean DISCONNECT fires no
        Last Will; without this a replica retired for good would keep its turn in the shared
        subscription until its session expired. Back within reap_after_s, it loses nothing."""
        client = self._connected_client
        if client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(2.0):
                await self.peers.goodbye(client)

    async def _expire_leases(self) -> None:
        """The `lease-expiry` task; every QUEUE_GAUGES_EVERY_S it also reads the queue's
        counts for the metrics (a count of every job: not on each tick)."""
        gauges_at = 0.0
        while True:
            await asyncio.sleep(self._lease_tick_s)
            n = await self.store.expire_leases(self._clock())
            if n:
                self.metrics.leases_ended.labels(reason="lease_expired").inc(n)
                self._log.info("leases_expired", count=n)
            if time.monotonic() >= gauges_at:
                gauges_at = time.monotonic() + QUEUE_GAUGES_EVERY_S
                summary = await self.store.summary()
                self.metrics.observe_queue(summary, self._clock())
                self.metrics.observe_vehicles(self.status.values())

    async def _wake_parked(self, client: aiomqtt.Client) -> None:
        """Tell parked cars (told 'no work') that work for a model they hold is queued."""
        while True:
            await asyncio.sleep(self._wake_tick_s)
            for vehicle_id in await self.store.wake(1000, self._clock()):
                await self._hint(client, vehicle_id, HintKind.WORK_AVAILABLE)

    async def _hint(self, client: aiomqtt.Client, vehicle_id: str, kind: HintKind) -> None:
        now = self._clock()
        hint = WorkHint(
            vehicle_id=vehicle_id,
            kind=kind,
            # Jittered: cars told "no work" together do not all ask again together.
            retry_after_s=self.idle_retry_s * random.uniform(0.8, 1.0)
            if kind is HintKind.NO_WORK
            else 0.0,
            issued_at=now,
            expires_at=now + HINT_LIFETIME_S,
        )
        self.hints[kind.value] += 1
        self.metrics.hints.labels(kind=kind.value).inc()
        await publish_acked(client, topic(vehicle_id, Channel.JOBS), sign_hint(hint, self._key))

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes):
                continue
            if message.topic.value.startswith(PRESENCE_PREFIX):
                self.peers.seen(message.topic.value, payload)
                continue
            where = parse_topic(message.topic.value)
            if where is None:
                continue
            vehicle_id, channel = where
            self.last_seen[vehicle_id] = self._clock()
            ids = _subscription_ids(message)
            if channel is Channel.STATUS and (VIEW_ID in ids or not ids):
                # A bad status is counted once, by the node that gets the shared copy.
                with contextlib.suppress(WireError):
                    self._view_status(vehicle_id, payload)
            try:
                # A retained status replayed on subscribe is old news, not a car going
                # offline now (Mosquitto 2.0 replays them to shared subscriptions too).
                live = not message.retain
                if channel is not Channel.STATUS or (live and (SHARED_ID in ids or not ids)):
                    await self._dispatch(client, vehicle_id, channel, payload)
            except WireError as err:
                self.refused[f"{channel.value}:{err.reason.value}"] += 1
                self.metrics.refused.labels(channel=channel.value, reason=err.reason.value).inc()
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
            await self._on_event(vehicle_id, payload)
        elif channel is Channel.STATUS:
            await self._on_status(vehicle_id, payload)
        elif channel is Channel.RESULTS:
            await self._on_result_message(vehicle_id, payload)

    async def _on_work(self, client: aiomqtt.Client, vehicle_id: str, raw: bytes) -> None:
        request = parse_model(
            raw, WorkRequest, what="work request", reason=Reason.MALFORMED_PAYLOAD
        )
        if request.vehicle_id != vehicle_id:
            raise WireError(Reason.WRONG_VEHICLE, f"request names {request.vehicle_id}")
        self.work_requests[vehicle_id] += 1
        self.metrics.work_requests.inc()
        now = self._clock()
        models = {m.sha256 for m in request.models}
        leases = await self.store.lease(vehicle_id, request.capacity, models, now)
        for lease in leases:
            signed, digest = self.sign_job(lease, vehicle_id, now)
            await self.store.record_assignment(lease.job_id, lease.attempt, vehicle_id, digest, now)
            await publish_acked(client, topic(vehicle_id, Channel.JOBS), signed)
        if leases:
            self.metrics.leases.inc(len(leases))
            # Debug, not info: one line per lease was 1.7 MB of log per node in `make scale`;
            # edge_fleet_leases_total counts them.
            self._log.debug("jobs_assigned", vehicle_id=vehicle_id, count=len(leases))
        elif self.idle_retry_s > 0:
            # Nothing for it now: it waits quietly until woken (agent/wire/hints.py).
            await self.store.park(vehicle_id, models, now)
            await self._hint(client, vehicle_id, HintKind.NO_WORK)

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

    async def _on_event(self, vehicle_id: str, raw: bytes) -> None:
        event = parse_model(raw, JobEvent, what="job event", reason=Reason.MALFORMED_PAYLOAD)
        if event.vehicle_id != vehicle_id:
            raise WireError(Reason.WRONG_VEHICLE, f"event names {event.vehicle_id}")
        self.events[vehicle_id][event.kind.value] += 1
        if event.kind in _STILL_HELD and event.job_id is not None and event.attempt is not None:
            await self.store.extend_lease(event.job_id, event.attempt, vehicle_id, self._clock())
        if event.kind in _HAND_BACK and event.job_id is not None and event.attempt is not None:
            reason = event.reason or event.kind.value
            ended = await self.store.hand_back(
                event.job_id,
                event.attempt,
                vehicle_id,
                reason,
                self._clock(),
                failure=counts_as_failure(event.kind.value, reason),
            )
            if ended:
                self.metrics.leases_ended.labels(reason=event.kind.value).inc(ended)

    def _parse_status(self, vehicle_id: str, raw: bytes) -> VehicleStatus:
        status = parse_model(raw, VehicleStatus, what="status", reason=Reason.MALFORMED_PAYLOAD)
        if status.vehicle_id != vehicle_id:
            raise WireError(Reason.WRONG_VEHICLE, f"status names {status.vehicle_id}")
        return status

    def _view_status(self, vehicle_id: str, raw: bytes) -> None:
        if not raw:  # a cleared retained message
            return
        status = self._parse_status(vehicle_id, raw)
        self.status[vehicle_id] = status
        self.online[vehicle_id] = status.online

    async def _on_status(self, vehicle_id: str, raw: bytes) -> None:
        """The shared copy: the one node that gets it returns an offline car's jobs."""
        if not raw:
            return
        status = self._parse_status(vehicle_id, raw)
        if not status.online:
            n = await self.store.vehicle_offline(vehicle_id, self._clock())
            if n:
                self.metrics.leases_ended.labels(reason="vehicle_offline").inc(n)
            self._log.info("vehicle_offline", vehicle_id=vehicle_id, requeued=n)

    async def _on_result_message(self, vehicle_id: str, raw: bytes) -> None:
        collector = self.collector
        try:
            body, done = await self._keep_result(vehicle_id, raw)
        except WireError as err:
            collector.rejected_for(err)
            raise
        collected = collector.record(body, vehicle_id, duplicate=done is Completion.DUPLICATE)
        self.metrics.results.labels(
            outcome="duplicate" if collected.duplicate else "accepted"
        ).inc()
        if self._on_result is not None:
            self._on_result(collected)

    async def _keep_result(self, vehicle_id: str, raw: bytes) -> tuple[ResultBody, Completion]:
        """Verify, open and record one result; WireError if any step refuses it."""
        sealed = self.collector.verify(vehicle_id, raw)
        # Opened under the digest the header names; the store then checks, in the same step
        # that keeps it, that this attempt went to this car with that digest.
        body = self.collector.open(sealed, sealed.job_digest)
        done = await self.store.complete(
            body.job_id,
            body.attempt,
            vehicle_id,
            sealed.job_digest,
            encode_result_body(body),
            self._clock(),
        )
        if done is Completion.NOT_SENT:
            raise WireError(
                Reason.UNKNOWN_JOB,
                f"no job {sealed.job_id} attempt {sealed.attempt} was sent to {vehicle_id} "
                "with that digest",
            )
        return body, done
