"""MQTT connection settings that both sides use, a guard against packets over the size we
accept, and a QoS 1 publish that keeps its task's cancellation.

TCP_NODELAY: MQTT's small packets (PUBACK, a status, an event) otherwise wait
behind Nagle's algorithm for the peer's delayed ACK: about 40 ms per QoS 1
publish on loopback, measured with bench/overhead.py. paho-mqtt does not set
it, so every client here passes these socket options.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiomqtt

NO_DELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


def client_tls(
    ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """TLS 1.2+ with the fleet CA as the only trust anchor, the broker's name checked, and
    this client's certificate presented (without one, a broker that takes a login instead).
    Never a plaintext fallback: the caller connects with this context or not at all."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def publish_acked(
    client: aiomqtt.Client, topic: str, payload: bytes, *, retain: bool = False
) -> None:
    """Publish at QoS 1 and return once the broker acknowledged it, unless the task was
    cancelled meanwhile: then raise CancelledError, even if the acknowledgement came too.

    aiomqtt waits for the PUBACK with asyncio.wait_for, which on Python 3.11 returns the
    result when it and a cancellation arrive together, and the cancellation is lost (fixed
    in 3.12). The task then runs on: a preempted job towards a worker already killed, a loop
    of a stopping agent past its shutdown. The request is still counted on the task."""
    await client.publish(topic, payload, qos=1, retain=retain)
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def connection_lost(client: aiomqtt.Client) -> None:
    """Run as a task beside a connection's other tasks: raises MqttError the moment the
    connection ends, so that the TaskGroup ends and the reconnect loop takes over at once.

    aiomqtt fails pending calls only when they time out (10 s): a PUBACK awaited when the
    broker went away is awaited that long. A loop that both reads messages and publishes
    (the fleet node's receiver) would sit blind that long after a broker restart, and only
    the message iterator notices a disconnection. aiomqtt keeps the disconnection in the
    private future `client._disconnected` (the same documented exception as `client._client`
    below); shielded, so that cancelling this task leaves it to aiomqtt's own exit."""
    import aiomqtt

    await asyncio.shield(client._disconnected)
    raise aiomqtt.MqttError("Disconnected")


def forget_stale_cancellations() -> None:
    """Call in a reconnect loop after its TaskGroup ended in an error.

    Python 3.11's TaskGroup cancels its parent task when a child fails after the group's
    `async with` body has finished, and then never takes that cancellation back (3.12 does).
    The parent's `cancelling()` count stays above 0, and `publish_acked` in that task would
    take every later publish for a cancellation: a fleet node or car that lost its broker
    once ended itself on its first publish after reconnecting. A real cancellation still
    arrives: uncancel() lowers the count, it does not withdraw a pending CancelledError."""
    task = asyncio.current_task()
    while task is not None and task.cancelling():
        task.uncancel()


class OversizedPacketError(ConnectionError):
    """Raised inside paho's read when the peer announces a packet larger than we accept; paho
    treats it as a lost connection, so the client disconnects without reading the packet."""


def guard_packet_size(
    client: aiomqtt.Client, limit_bytes: int, on_oversized: Callable[[int], None]
) -> None:
    """Disconnect, before buffering, from a peer that announces a packet over `limit_bytes`.

    The Maximum Packet Size we send in CONNECT binds an honest broker only: paho-mqtt reads
    whatever remaining length a packet's fixed header announces (up to 256 MB) into memory
    before anything else can look at it. paho decodes the remaining length first, then asks
    its `_sock_recv` for the body; this wraps that call on the client's paho instance and
    refuses the body while the decoded length is over the limit, so at most the fixed
    header and what already sits in the socket buffer are ever read. `on_oversized` gets the
    announced length. paho 2.x internals (`_sock_recv`, `_in_packet`), pinned by
    aiomqtt>=2.5,<3; tests/adversarial/test_hostile_broker.py fails if they change.
    """
    paho = client._client
    receive = paho._sock_recv
    reported = False

    def guarded(bufsize: int) -> bytes:
        nonlocal reported
        packet = paho._in_packet
        if packet["have_remaining"] and packet["remaining_length"] > limit_bytes:
            announced = int(packet["remaining_length"])
            if not reported:
                reported = True
                on_oversized(announced)
            raise OversizedPacketError(
                f"peer announced a {announced}-byte packet (limit {limit_bytes})"
            )
        return receive(bufsize)

    paho._sock_recv = guarded  # type: ignore[method-assign]


def is_connection_error(exc: BaseException) -> bool:
    """The connection failed (aiomqtt's MqttError), as opposed to one message's trouble."""
    import aiomqtt

    return isinstance(exc, aiomqtt.MqttError)


# MQTT 5 DISCONNECT reason code: another connection with this client id took the session
# (two agents, or a cloned config, sharing one vehicle id).
SESSION_TAKEN_OVER = 142


def on_disconnect_reason(client: aiomqtt.Client, callback: Callable[[int], None]) -> None:
    """Tell `callback` the reason code of each disconnection, before aiomqtt handles it.

    aiomqtt turns every disconnection into "Disconnected during message iteration" and
    drops the broker's reason; this chains paho's public `on_disconnect` callback on the
    client's paho instance (`client._client`, the same documented exception as above).
    """
    paho = client._client
    inner: Any = paho.on_disconnect  # paho types it for the v1 and v2 callback signatures

    def hooked(c: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any = None) -> None:
        with contextlib.suppress(TypeError, ValueError):
            callback(int(getattr(reason_code, "value", reason_code)))
        if inner is not None:
            inner(c, userdata, flags, reason_code, properties)

    paho.on_disconnect = hooked


# CONNACK reason codes that no retry changes (MQTT 5 section 3.2.2.2; MQTT 3.1.1 return codes
# 1, 2, 4 and 5 are their older forms). Anything else (server unavailable or busy, quota or
# connection rate exceeded, a lost socket) is an outage and is retried as one.
PERMANENT_REFUSALS: dict[int, str] = {
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x8A: "banned",
    0x8C: "bad authentication method",
}
_MQTT311_REFUSALS = {1: 0x84, 2: 0x85, 4: 0x86, 5: 0x87}


def permanent_refusal(exc: BaseException) -> str | None:
    """The reason when `exc` is the broker refusing this client for good (bad login, not
    authorized, banned, client id not valid); None for anything a retry may mend."""
    from aiomqtt.exceptions import MqttConnectError

    if not isinstance(exc, MqttConnectError):
        return None
    rc = exc.rc
    if isinstance(rc, int) and not hasattr(rc, "value"):
        code = _MQTT311_REFUSALS.get(rc, -1)
    else:
        code = int(getattr(rc, "value", -1))
    return PERMANENT_REFUSALS.get(code)


def on_connack(client: aiomqtt.Client, callback: Callable[[Any], None]) -> None:
    """Give `callback` the CONNACK's MQTT 5 properties (None when there are none) of each
    successful connection, before aiomqtt handles it: what the broker offers (shared
    subscriptions, the session expiry it grants). Chains paho's public `on_connect` on
    `client._client`, like `on_disconnect_reason`."""
    paho = client._client
    inner: Any = paho.on_connect

    def hooked(c: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any = None) -> None:
        if not getattr(reason_code, "is_failure", False):
            with contextlib.suppress(Exception):
                callback(properties)
        if inner is not None:
            inner(c, userdata, flags, reason_code, properties)

    paho.on_connect = hooked
