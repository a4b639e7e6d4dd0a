"""Talking to systemd: the sd_notify protocol (READY, STATUS, WATCHDOG, STOPPING).

A small module of our own rather than a dependency: the protocol is one
datagram per message to the socket named in $NOTIFY_SOCKET (a path, or an
abstract socket when it starts with "@"), and the PyPI package for it
(sdnotify) has had no release since 2017. Without $NOTIFY_SOCKET every call is
a no-op, so the agent runs the same outside systemd.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._watchdog_usec = 0
        pid = env.get("WATCHDOG_PID")
        if env.get("WATCHDOG_USEC", "").isdigit() and (pid is None or pid == str(os.getpid())):
            self._watchdog_usec = int(env["WATCHDOG_USEC"])

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half the watchdog timeout, as sd_watchdog_enabled(3) advises."""
        return self._watchdog_usec / 2e6 if self._watchdog_usec else None

    def send(self, **fields: str) -> bool:
        """Send KEY=value lines (e.g. READY="1", STATUS="..."); False if not under systemd."""
        if not self._address:
            return False
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.sendto(message, self._address)
            except OSError:
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY="1", STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1")

    def stopping(self) -> bool:
        return self.send(STOPPING="1", STATUS="stopping")
