"""The link: the only owner of the MQTT client.

Tasks:
  mqtt-connection    connects (the backoff reset only by a healthy connection, packets
                     over the limit refused before they are read), subscribes, and runs,
                     per connection:
      outbox-sender      the outbox's results, in order (agent.runtime.outbox)
      job-receiver       job messages to intake, trust policy updates to intake
      work-requester     asks for work while the gate is open and a slot is free
      status-publisher   keeps the retained status current
      job-heartbeat      tells the fleet which jobs this vehicle still holds

Everything else that reaches the broker goes through `publish` (waits through outages
until the broker acknowledges) or the recorder's event sink, which is `publish_event`.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import AgentConfig
from agent.core.admission import HeldModel
from agent.kit.backoff import ReconnectBackoff
from agent.kit.credentials import CredentialError
from agent.kit.mqtt import (
    NO_DELAY,
    SESSION_TAKEN_OVER,
    forget_stale_cancellations,
    guard_packet_size,
    on_disconnect_reason,
    permanent_refusal,
    publish_acked,
)
from agent.runtime.outbox import Outbox
from agent.runtime.record import Recorder
from agent.wire.codec import dump_model
from agent.wire.hints import HintKind, WorkHint, is_hint
from agent.wire.messages import EventKind, JobEvent, ModelHeld, VehicleStatus, WorkRequest
from agent.wire.topics import POLICY_TOPIC, Channel, topic

# Room for MQTT headers and topic names on top of the largest payload we accept.
PACKET_OVERHEAD = 4096
# A connection must stay up this long before the reconnect backoff starts again from its base.
HEALTHY_AFTER_S = 30.0
# After another connection took over our session (a duplicate vehicle id): wait at least
# this long before trying again, instead of the two flapping every half second.
TAKEN_OVER_BACKOFF_S = 30.0
SHORT_CONNECTION_S = 5.0
SHORT_CONNECTIONS_TAKEN_OVER = 3
# The longest a 'no work' hint keeps this car from asking: a lost 'work available' costs no more.
MAX_QUIET_S = 900.0

Key = tuple[str, int]


def _counting_queue(
    on_drop: Callable[[aiomqtt.Message], None],
) -> type[asyncio.Queue[aiomqtt.Message]]:
    """aiomqtt's inbound queue type, telling `on_drop` about each message it has to discard."""

    class CountingQueue(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            try:
                super().put_nowait(item)
            except asyncio.QueueFull:
                on_drop(item)
                raise

    return CountingQueue


class Link:
    def __init__(
        self,
        config: Callable[[], AgentConfig],
        recorder: Recorder,
        outbox: Outbox,
        *,
        tls: ssl.SSLContext | None,
        clock: Callable[[], float],
        on_job: Callable[[bytes], Awaitable[None]],
        on_hint: Callable[[bytes], WorkHint | None],
        on_policy: Callable[[bytes], Awaitable[None]] | None,
        on_connect: Callable[[], Awaitable[None]],
        status: Callable[[bool], VehicleStatus],
        may_ask: Callable[[], bool],
        busy_slots: Callable[[], int],
        capacity: int,
        models: Callable[[], Mapping[str, HeldModel]],
        held_jobs: Callable[[], Iterable[Key]],
    ) -> None:
        self._config = config
        self.vehicle_id = config().vehicle.id
        self._rec = recorder
        self._outbox = outbox
        self._tls = tls
        self._clock = clock
        self._on_job = on_job
        self._on_hint = on_hint
        self._on_policy = on_policy
        self._on_connect = on_connect
        self._status = status
        self._may_ask = may_ask
        self._busy_slots = busy_slots
        self._capacity = capacity
        self._models = models
        self._held_jobs = held_jobs
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._status_dirty = asyncio.Event()
        self._wake_requester = asyncio.Event()
        self._outstanding = 0  # jobs asked for and not yet arrived
        self._request_id = 0
        # Told 'no work' by the fleet: no asking before this (monotonic), unless woken.
        self.quiet_until = 0.0
        # For `edge-agent status`: since when connected, and the last failure and when.
        self.connected_at: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._disconnect_reason: int | None = None
        self._short_connections = 0  # connections in a row the broker closed within seconds
        self._taken_over = False

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def status_changed(self) -> None:
        """The retained status should say something new."""
        self._status_dirty.set()

    def work_wanted(self) -> None:
        """A slot may have freed, or the gate changed: look whether to ask for work."""
        self._wake_requester.set()

    @property
    def _max_packet_bytes(self) -> int:
        return self._config().agent.max_message_bytes + PACKET_OVERHEAD

    # ---- the connection -------------------------------------------------------

    def _inbound_dropped(self, message: aiomqtt.Message) -> None:
        """A message arrived while the inbound queue was full (a flood): it is dropped, counted
        and logged. A job dropped here was never accepted: the fleet's lease expires and it
        goes to another car."""
        dropped = self._rec.counts["inbound_dropped"] + 1
        loud = dropped == 1 or dropped % 100 == 0
        self._rec.note(
            "inbound_dropped",
            "inbound_queue_full_message_dropped" if loud else None,
            "warning",
            topic=message.topic.value,
            dropped_total=dropped,
            queue_limit=self._capacity * 4 + 16,
        )

    def _oversized_packet(self, announced: int) -> None:
        """The broker announced a packet over our limit: we disconnect before reading it."""
        self._rec.note(
            "oversized_packets",
            "oversized_packet_refused",
            "error",
            announced_bytes=announced,
            limit_bytes=self._max_packet_bytes,
            what="disconnected before reading it; reconnecting with backoff",
        )

    def _make_client(self) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.MaximumPacketSize = self._max_packet_bytes
        # The Last Will is fixed at connect and published whenever the connection dies: it says
        # nothing that can go stale meanwhile (the policy version, the gate's reasons).
        offline = self._status(False).model_copy(
            update={"reasons": ("connection_lost",), "gate_open": False, "policy_version": None}
        )
        b = self._config().broker
        login = b.login()  # read at each connection: a rotated password counts next time
        return aiomqtt.Client(
            b.host,
            b.port,
            username=login.username if login else None,
            password=login.password if login else None,
            identifier=f"vehicle-{self.vehicle_id}",
            protocol=aiomqtt.ProtocolVersion.V5,
            keepalive=b.keepalive_s,
            will=aiomqtt.Will(
                topic(self.vehicle_id, Channel.STATUS), dump_model(offline), qos=1, retain=True
            ),
            max_queued_incoming_messages=self._capacity * 4 + 16,
            queue_type=_counting_queue(self._inbound_dropped),
            max_inflight_messages=20,
            properties=props,
            timeout=10,
            socket_options=NO_DELAY,
            tls_context=self._tls,
        )

    async def run(self) -> None:
        """The `mqtt-connection` task."""
        backoff = ReconnectBackoff(base_s=0.5, cap_s=30.0, healthy_after_s=HEALTHY_AFTER_S)
        while True:
            try:
                client = self._make_client()
                guard_packet_size(client, self._max_packet_bytes, self._oversized_packet)
                self._disconnect_reason = None
                on_disconnect_reason(client, self._note_disconnect_reason)
                async with client:
                    self._client = client
                    await client.subscribe(topic(self.vehicle_id, Channel.JOBS), qos=1)
                    if self._on_policy is not None:
                        await client.subscribe(POLICY_TOPIC, qos=1)
                    self._connected.set()
                    self.connected_at = self._clock()
                    self._rec.metrics.connected.set(1)
                    backoff.connected(time.monotonic())
                    b = self._config().broker
                    self._rec.log("info", "connected", broker=f"{b.host}:{b.port}")
                    self._status_dirty.set()
                    await self._on_connect()
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._outbox.send(self._acked(client)), name="outbox-sender")
                        tg.create_task(self._receive(client), name="job-receiver")
                        tg.create_task(self._request_work(client), name="work-requester")
                        tg.create_task(self._publish_statuses(client), name="status-publisher")
                        tg.create_task(self._heartbeat(client), name="job-heartbeat")
            except* aiomqtt.MqttError as group:
                refusal = permanent_refusal(group.exceptions[0])
                if refusal is None:
                    self._failed(str(group.exceptions[0]))
                else:
                    self._refused(refusal)
                    backoff.refused()
                forget_stale_cancellations()
            except* CredentialError as group:  # the password file went missing or unsafe
                self._rec.log("error", "broker_login_unreadable", reason=str(group.exceptions[0]))
                self.last_error, self.last_error_at = str(group.exceptions[0]), self._clock()
                backoff.refused()
            finally:
                self.connected_at = None
                self._rec.metrics.connected.set(0)
                self._connected.clear()
                self._client = None
                self._outstanding = 0
                self._outbox.changed.set()  # a shutdown waiting for the outbox stops waiting
            delay = backoff.next_delay(time.monotonic())
            if self._taken_over:
                delay = max(delay, TAKEN_OVER_BACKOFF_S)  # do not fight the other connection
            self._rec.note("reconnects", "reconnect_wait", delay_s=round(delay, 2))
            await asyncio.sleep(delay)

    def _refused(self, reason: str) -> None:
        """The broker refused this car for good: not an outage, and no retry soon mends it."""
        self._rec.metrics.broker_refusals.labels(reason=reason).inc()
        self._rec.log(
            "error",
            "refused_by_broker",
            reason=reason,
            what="fix [broker] username / password_file, this vehicle's certificate, or the "
            "broker's ACL; retrying at the backoff's cap",
        )
        self.last_error, self.last_error_at = f"refused by the broker: {reason}", self._clock()

    def _note_disconnect_reason(self, code: int) -> None:
        self._disconnect_reason = code

    def _failed(self, reason: str) -> None:
        """A connection attempt or a connection ended in an error: logged and kept for status.

        Another connection with our client id takes the session over: brokers that say so
        send DISCONNECT 0x8E (session taken over); mosquitto 2.0 just closes the socket. So
        a run of connections each closed by the broker within seconds of being accepted is
        read the same way: two agents (or a copied config) share this vehicle id.
        """
        now = self._clock()
        short = self.connected_at is not None and now - self.connected_at < SHORT_CONNECTION_S
        self._short_connections = self._short_connections + 1 if short else 0
        event = "disconnected"
        if self._disconnect_reason == SESSION_TAKEN_OVER:
            event, reason = (
                "vehicle_id_in_use",
                (
                    f"another connection with vehicle id {self.vehicle_id!r} took over this one's "
                    "session: two agents, or a copied config, share this vehicle id; stop the "
                    "other one or give it its own id"
                ),
            )
        elif self._short_connections >= SHORT_CONNECTIONS_TAKEN_OVER:
            event, reason = (
                "connection_closed_after_connect",
                (
                    f"the broker closed the connection right after accepting it, "
                    f"{self._short_connections} times in a row: most often two agents, or a copied "
                    f"config, share this vehicle id ({self.vehicle_id!r}) and take the session "
                    "from each other; if not, the broker's log says why. Retrying every "
                    f"{TAKEN_OVER_BACKOFF_S:g} s"
                ),
            )
        self._taken_over = event != "disconnected"
        self._rec.log("error" if self._taken_over else "warning", event, reason=reason)
        self.last_error, self.last_error_at = reason, now

    @staticmethod
    def _acked(client: aiomqtt.Client) -> Callable[[str, bytes], Awaitable[None]]:
        async def send(topic_name: str, payload: bytes) -> None:
            await publish_acked(client, topic_name, payload)

        return send

    # ---- out ------------------------------------------------------------------------

    async def publish(self, topic_name: str, payload: bytes) -> None:
        """Publish at QoS 1, waiting through disconnections until the broker acknowledges."""
        while True:
            await self._connected.wait()
            client = self._client
            if client is None:
                await asyncio.sleep(0.05)
                continue
            try:
                await publish_acked(client, topic_name, payload)
            except aiomqtt.MqttError as exc:
                self._rec.log("warning", "publish_retry", topic=topic_name, reason=str(exc))
                await asyncio.sleep(0.2)
            else:
                return

    async def publish_event(self, event: JobEvent) -> None:
        """The recorder's sink: a job's event on the events topic."""
        await self.publish(topic(self.vehicle_id, Channel.EVENTS), dump_model(event))

    async def say_goodbye(self) -> None:
        """The offline status, at shutdown (a clean disconnect does not fire the Last Will)."""
        client = self._client
        if client is None:
            return
        try:
            async with asyncio.timeout(2.0):
                await self._publish_status(client, online=False)
        except (TimeoutError, aiomqtt.MqttError):
            self._rec.log("warning", "offline_status_not_sent")

    async def outbox_flushed(self, timeout_s: float) -> bool:
        """Wait, while connected, until the outbox is empty; False if it did not empty."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._outbox.depth and self._connected.is_set():
                    self._outbox.changed.clear()
                    await self._outbox.changed.wait()  # set on each removal and on disconnect
        except TimeoutError:
            return False
        return True

    async def _publish_status(self, client: aiomqtt.Client, *, online: bool) -> None:
        status = self._status(online)
        await publish_acked(
            client, topic(self.vehicle_id, Channel.STATUS), dump_model(status), retain=True
        )

    async def _publish_statuses(self, client: aiomqtt.Client) -> None:
        while True:
            await self._status_dirty.wait()
            self._status_dirty.clear()
            await self._publish_status(client, online=True)

    async def _request_work(self, client: aiomqtt.Client) -> None:
        while True:
            self._wake_requester.clear()
            free = self._capacity - self._busy_slots() - self._outstanding
            # Ask as soon as a slot frees: a request costs ~200 bytes and keeps the queue full.
            if free > 0 and self._may_ask():
                self._request_id += 1
                request = WorkRequest(
                    vehicle_id=self.vehicle_id,
                    request_id=self._request_id,
                    capacity=free,
                    models=tuple(
                        ModelHeld(name=m.name, sha256=m.sha256) for m in self._models().values()
                    ),
                    sent_at=self._clock(),
                )
                self._outstanding += free
                await publish_acked(
                    client, topic(self.vehicle_id, Channel.WORK), dump_model(request)
                )
            await self._until_asking()

    async def _until_asking(self) -> None:
        """Wait until something changed here (a job came, a slot freed, the gate moved, the
        fleet said there is work), or the interval passed and the fleet did not say 'no work'
        for longer (see agent/wire/hints.py)."""
        deadline = time.monotonic() + self._config().agent.work_request_interval_s
        while True:
            wait = max(deadline, self.quiet_until) - time.monotonic()
            if wait <= 0:
                self._outstanding = 0  # whatever was not sent by now is not coming
                return
            try:
                async with asyncio.timeout(wait):
                    await self._wake_requester.wait()
            except TimeoutError:
                continue  # a 'no work' hint may have arrived meanwhile: look again
            self.quiet_until = 0.0
            return

    def _hinted(self, hint: WorkHint) -> None:
        if hint.kind is HintKind.NO_WORK:
            self._outstanding = 0
            quiet_s = min(hint.retry_after_s, MAX_QUIET_S)
            self.quiet_until = time.monotonic() + quiet_s
            self._rec.note("work_hints", "no_work", "debug", quiet_s=quiet_s)
        else:
            self._rec.note("work_hints", "work_available", "debug")
            self._wake_requester.set()

    async def _heartbeat(self, client: aiomqtt.Client) -> None:
        """Tell the dispatcher every heartbeat_s which jobs this vehicle still holds."""
        while True:
            await asyncio.sleep(self._config().agent.heartbeat_s)
            for job_id, attempt in list(self._held_jobs()):
                event = JobEvent(
                    vehicle_id=self.vehicle_id,
                    job_id=job_id,
                    attempt=attempt,
                    kind=EventKind.HEARTBEAT,
                    at=self._clock(),
                )
                await publish_acked(
                    client, topic(self.vehicle_id, Channel.EVENTS), dump_model(event)
                )

    # ---- in ---------------------------------------------------------------------------

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            raw = payload if isinstance(payload, bytes) else str(payload).encode()
            if message.topic.matches(POLICY_TOPIC):
                if self._on_policy is not None:
                    await self._on_policy(raw)
                continue
            if is_hint(raw):
                hint = self._on_hint(raw)
                if hint is not None:
                    self._hinted(hint)
                continue
            self._outstanding = max(0, self._outstanding - 1)
            await self._on_job(raw)
            self._wake_requester.set()
