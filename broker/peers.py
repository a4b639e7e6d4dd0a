"""Fleet nodes watch each other, so that a replica that died does not swallow its share.

A fleet node's session is persistent: while it restarts, the broker keeps its messages.
But Mosquitto (2.0) keeps handing an offline member of a shared subscription its turn: a
replica that was `kill -9`ed and does not come back would swallow a third of the results
(of three replicas) until its session expires. So each node announces itself, retained,
on `fleet/v1/nodes/<group>/<node>`, with its Last Will saying it is gone. When a peer has
been gone `reap_after_s` (longer than a restart takes), a surviving node ends the peer's
session: it connects with the peer's client id, clean start, session expiry 0, and leaves.
The broker then drops the peer from the group. What the peer's session held is lost to
the fleet, and the leases bring those jobs back. When every node is down, nobody reaps:
the sessions keep everything until the nodes return.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.kit.credentials import BrokerLogin
from agent.kit.logs import get_logger
from agent.kit.mqtt import NO_DELAY, publish_acked

PRESENCE_PREFIX = "fleet/v1/nodes"
MAX_PRESENCE_BYTES = 1024


def presence_topic(group: str, node: str) -> str:
    return f"{PRESENCE_PREFIX}/{group}/{node}"


class Peers:
    def __init__(
        self,
        *,
        group: str,
        node: str,
        client_id: str,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        reap_after_s: float,
        login: Callable[[], BrokerLogin | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.group, self.node, self.client_id = group, node, client_id
        self._host, self._port, self._tls, self._login = host, port, tls, login
        self.reap_after_s = reap_after_s
        self._clock = clock
        self.gone_since: dict[str, tuple[float, str]] = {}  # peer -> (since, its client id)
        self.online: set[str] = set()
        self.reaped: list[str] = []
        self._log = get_logger(component="fleet-peers", node=node)

    @property
    def filter(self) -> str:
        return f"{PRESENCE_PREFIX}/{self.group}/+"

    def _presence(self, online: bool) -> bytes:
        body = {"node": self.node, "client_id": self.client_id, "online": online, "at": time.time()}
        return json.dumps(body).encode()

    def will(self) -> aiomqtt.Will:
        return aiomqtt.Will(
            presence_topic(self.group, self.node), self._presence(False), qos=1, retain=True
        )

    async def announce(self, client: aiomqtt.Client) -> None:
        await publish_acked(
            client, presence_topic(self.group, self.node), self._presence(True), retain=True
        )

    async def goodbye(self, client: aiomqtt.Client) -> None:
        await publish_acked(
            client, presence_topic(self.group, self.node), self._presence(False), retain=True
        )

    def seen(self, topic_name: str, raw: bytes) -> None:
        """A presence message (ours, a peer's, or garbage: ignored)."""
        node = topic_name.rsplit("/", 1)[-1]
        if node == self.node or not raw or len(raw) > MAX_PRESENCE_BYTES:
            return
        try:
            body = json.loads(raw)
            online, client_id = bool(body["online"]), str(body["client_id"])
        except (ValueError, KeyError, TypeError):
            self._log.warning("peer_presence_unreadable", peer=node)
            return
        if online:
            self.online.add(node)
            self.gone_since.pop(node, None)
        elif node not in self.gone_since:
            self.online.discard(node)
            self.gone_since[node] = (self._clock(), client_id)
            self._log.warning("peer_gone", peer=node, reap_after_s=self.reap_after_s)

    async def reap(self) -> None:
        """The `peer-reaper` task: end the sessions of peers gone longer than reap_after_s."""
        while True:
            await asyncio.sleep(min(1.0, self.reap_after_s / 2))
            now = self._clock()
            for node, (since, client_id) in list(self.gone_since.items()):
                if now - since >= self.reap_after_s:
                    await self._end_session(node, client_id)

    async def _end_session(self, node: str, client_id: str) -> None:
        connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect.SessionExpiryInterval = 0
        login = self._login()
        try:
            async with aiomqtt.Client(
                self._host,
                self._port,
                username=login.username if login else None,
                password=login.password if login else None,
                identifier=client_id,
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=True,
                properties=connect,
                socket_options=NO_DELAY,
                tls_context=self._tls,
                timeout=10,
            ):
                pass
        except aiomqtt.MqttError as exc:
            self._log.warning("peer_reap_failed", peer=node, reason=str(exc))
            return
        self.gone_since.pop(node, None)
        self.reaped.append(node)
        self._log.warning("peer_session_ended", peer=node, client_id=client_id)
