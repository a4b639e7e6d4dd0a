"""Kernel uevents: the rig's way of saying a signal changed, so the gate hears it at once.

The kernel broadcasts a uevent on netlink (NETLINK_KOBJECT_UEVENT, multicast group 1)
when a power supply goes online or offline, and on thermal trip points where the
thermal driver reports them. A datagram is `ACTION@DEVPATH` then `KEY=VALUE` fields,
each NUL-terminated:

    change@/devices/platform/.../power_supply/ac\\0ACTION=change\\0SUBSYSTEM=power_supply\\0...

The watcher reads them on the event loop (a nonblocking socket, at most
MAX_UEVENT_BYTES a datagram, a bounded number per wake) and calls back for the
subsystems asked for; the daemon then looks at the car without waiting for its
next poll. Where there is no netlink (a container without it, a non-Linux host),
`start` says so and the daemon keeps polling: uevents shorten the delay, polling
still bounds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterable

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1  # the kernel's own broadcasts (udev re-sends on group 2, prefixed "libudev")
MAX_UEVENT_BYTES = 8192  # the kernel's UEVENT_BUFFER_SIZE is 2048
MAX_PER_WAKE = 64  # a burst of uevents cannot hold the loop


def parse_uevent(data: bytes) -> dict[str, str] | None:
    """The fields of one kernel uevent datagram, or None if it is not one (udev's
    re-broadcasts, garbage, an oversized datagram)."""
    if len(data) > MAX_UEVENT_BYTES or b"@" not in data.split(b"\0", 1)[0]:
        return None
    head, *fields = data.split(b"\0")
    try:
        action, devpath = head.decode("ascii").split("@", 1)
        parsed = {"ACTION": action, "DEVPATH": devpath}
        for field in fields:
            if not field:
                continue
            key, sep, value = field.decode("utf-8", "replace").partition("=")
            if sep:
                parsed[key] = value
    except (UnicodeDecodeError, ValueError):
        return None
    return parsed


class UeventWatcher:
    """Calls `on_change(fields)` for each kernel uevent of `subsystems`."""

    def __init__(
        self, subsystems: Iterable[str], on_change: Callable[[dict[str, str]], None]
    ) -> None:
        self.subsystems = frozenset(subsystems)
        self._on_change = on_change
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.seen = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> str | None:
        """Listen; None once listening, else why not (the caller keeps polling)."""
        if not self.subsystems:
            return "no subsystem to watch"
        try:
            sock = socket.socket(
                socket.AF_NETLINK,  # type: ignore[attr-defined,unused-ignore]
                socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                NETLINK_KOBJECT_UEVENT,
            )
        except (OSError, AttributeError) as exc:
            return f"no kernel uevents here: {exc}"
        try:
            sock.bind((0, KERNEL_GROUP))
        except OSError as exc:
            sock.close()
            return f"cannot listen to kernel uevents: {exc}"
        self._sock, self._loop = sock, loop
        loop.add_reader(sock.fileno(), self._readable)
        return None

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(MAX_PER_WAKE):
            try:
                data = sock.recv(MAX_UEVENT_BYTES + 1)
            except BlockingIOError:
                return
            except OSError:  # ENOBUFS: the kernel dropped some; the next poll catches up
                self._on_change({"ACTION": "overrun"})
                return
            fields = parse_uevent(data)
            if fields is not None and fields.get("SUBSYSTEM") in self.subsystems:
                self.seen += 1
                self._on_change(fields)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock.fileno())
        sock.close()
