"""The local control socket: `edge-agent status` and live vehicle control for rigs.

A Unix stream socket (mode 0600, in the state directory by default) that takes
one JSON request per line and answers one JSON line:

    {"op": "status"}                             -> {"ok": true, "status": {...}}
    {"op": "set", "fields": {"gear": "D"}}       -> {"ok": true, "state": {...}}
    anything else                                -> {"ok": false, "error": "..."}

Only the emulated part of the car can be set (gear, plug, charger, ambient,
temperatures, state of charge), so a person at a Pi or Jetson rig can "unplug
the car" and watch the agent react.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.kit.logs import get_logger

MAX_REQUEST_BYTES = 4096
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107

StatusFn = Callable[[], dict[str, Any]]
SetFn = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(Exception):
    """Raised when the control socket cannot be created or reached."""


def _handle(line: bytes, status: StatusFn, set_vehicle: SetFn | None) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return {"ok": False, "error": "request is not JSON"}
    if not isinstance(request, dict):
        return {"ok": False, "error": "request must be a JSON object"}
    op = request.get("op")
    if op == "status":
        return {"ok": True, "status": status()}
    if op == "set":
        if set_vehicle is None:
            return {"ok": False, "error": "this vehicle has no emulated state to set"}
        fields = request.get("fields")
        if not isinstance(fields, dict) or not fields:
            return {"ok": False, "error": "set needs a non-empty 'fields' object"}
        try:
            return {"ok": True, "state": set_vehicle(fields)}
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            return {"ok": False, "error": f"{where}: {first['msg']}"}
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
    return {"ok": False, "error": f"unknown op {op!r}; use 'status' or 'set'"}


async def serve_control(path: Path, status: StatusFn, set_vehicle: SetFn | None) -> None:
    """Serve the control socket at `path` until cancelled."""
    log = get_logger(component="control")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ControlError(f"control socket path {path} is longer than {MAX_SOCKET_PATH} bytes")
    _prepare(path)

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            if len(line) > MAX_REQUEST_BYTES:
                reply: dict[str, Any] = {"ok": False, "error": "request too large"}
            else:
                reply = _handle(line, status, set_vehicle)
            if reply.get("ok") and "state" in reply:
                log.info("vehicle_set_by_operator", fields=json.loads(line).get("fields"))
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    old = os.umask(0o177)  # the socket is created 0600: only the agent's user may control it
    try:
        server = await asyncio.start_unix_server(
            client, path=str(path), limit=MAX_REQUEST_BYTES * 2
        )
    finally:
        os.umask(old)
    try:
        async with server:
            await server.serve_forever()
    finally:
        _remove(path)


def _prepare(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove(path)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def request(path: Path, payload: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
    """One blocking request to a running agent (used by the CLI)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(str(path))
            s.sendall(json.dumps(payload).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError:
        raise ControlError(f"no agent control socket at {path}: is the agent running?") from None
    except PermissionError:
        raise ControlError(
            f"permission denied on {path}: run as the agent's user or root"
        ) from None
    except OSError as exc:
        raise ControlError(f"cannot talk to the agent at {path}: {exc}") from None
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise ControlError(f"the agent at {path} sent a reply that is not JSON") from None
    return reply
