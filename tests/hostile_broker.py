"""A hostile MQTT 5 broker on loopback: it speaks just enough of the protocol to be connected
to (CONNACK, SUBACK, PUBACK, PINGRESP), then misbehaves in one chosen way.

  oversized     after the first SUBACK, announces a PUBLISH of `announce_bytes` and streams
                zeros into it until the client hangs up; counts what the socket took.
  flaky_puback  on the client's first QoS 1 PUBLISH, sends half a PUBACK and closes (a peer
                that accepts and then fails).

Everything it sees is counted from outside the agent: connections, bytes sent, when each
connection began and ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def _read_varint(reader: asyncio.StreamReader) -> int:
    value, mult = 0, 1
    for _ in range(4):
        (byte,) = await reader.readexactly(1)
        value += (byte & 0x7F) * mult
        if not byte & 0x80:
            return value
        mult *= 128
    raise ValueError("remaining length over 4 bytes")


def _decode_varint(buf: bytes, at: int) -> tuple[int, int]:
    value, mult = 0, 1
    while True:
        byte = buf[at]
        at += 1
        value += (byte & 0x7F) * mult
        if not byte & 0x80:
            return value, at
        mult *= 128


@dataclass
class HostileBroker:
    behaviour: str  # "oversized" or "flaky_puback"
    announce_bytes: int = 100 * 1024 * 1024
    connections: int = 0
    connected_at: list[float] = field(default_factory=list)
    bytes_streamed: list[int] = field(default_factory=list)  # per oversized attempt
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.connected_at.append(time.monotonic())
        try:
            await self._session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            (first,) = await reader.readexactly(1)
            body = await reader.readexactly(await _read_varint(reader))
            kind = first >> 4
            if kind == 1:  # CONNECT
                writer.write(bytes([0x20, 3, 0, 0, 0]))  # CONNACK: success, no properties
            elif kind == 8:  # SUBSCRIBE
                pid = body[:2]
                props, at = _decode_varint(body, 2)
                at += props
                filters = 0
                while at < len(body):
                    at += 2 + int.from_bytes(body[at : at + 2], "big") + 1
                    filters += 1
                payload = pid + b"\x00" + b"\x01" * filters
                writer.write(bytes([0x90]) + _varint(len(payload)) + payload)
                if self.behaviour == "oversized":
                    await writer.drain()
                    await self._oversized(writer)
                    return
            elif kind == 3 and (first >> 1) & 3:  # PUBLISH at QoS 1
                tlen = int.from_bytes(body[:2], "big")
                pid = body[2 + tlen : 4 + tlen]
                if self.behaviour == "flaky_puback":
                    writer.write(bytes([0x40, 2]) + pid[:1])  # half a PUBACK, then gone
                    await writer.drain()
                    return
                writer.write(bytes([0x40, 2]) + pid)
            elif kind == 12:  # PINGREQ
                writer.write(bytes([0xD0, 0]))
            elif kind == 14:  # DISCONNECT
                return
            await writer.drain()

    async def _oversized(self, writer: asyncio.StreamWriter) -> None:
        """A PUBLISH announcing `announce_bytes`, streamed until the client hangs up."""
        topic = b"fleet/v1/vehicles/x/jobs"
        header = bytes([0x30]) + _varint(self.announce_bytes)
        writer.write(header + len(topic).to_bytes(2, "big") + topic + b"\x00")
        sent = 0
        chunk = bytes(64 * 1024)
        self.bytes_streamed.append(0)
        try:
            while sent < self.announce_bytes:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 5)
                sent += len(chunk)
                self.bytes_streamed[-1] = sent
        except (ConnectionError, TimeoutError):
            pass
