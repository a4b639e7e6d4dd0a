"""The state disk, as every room sees it: writes off the event loop, and a full or failing
disk that closes the gate instead of ending the daemon.

Blocking work (the state database, outbox files, sealing a result) runs on one thread of
its own: SQLite takes one writer at a time anyway, and the default executor would grow to
cores + 4 threads (~0.5 MB each) and keep them. A write the disk refuses marks the disk
faulty (the gate closes with `state_disk_unavailable`); the `state-probe` task tries it
again every second and, once it takes writes, tells whoever registered (`on_recovered`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from agent.runtime.record import Recorder
from agent.state.ledger import is_storage_error

PROBE_EVERY_S = 1.0

_T = TypeVar("_T")
_P = ParamSpec("_P")


class StateDisk:
    def __init__(
        self,
        state_dir: Path,
        probe: Callable[[float], None],
        recorder: Recorder,
        clock: Callable[[], float],
    ) -> None:
        self._dir = state_dir
        self._probe = probe  # a write that proves the disk takes writes (JobStore.probe)
        self._rec = recorder
        self._clock = clock
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-io")
        self.fault: str | None = None  # what failed, while the disk refuses
        self._faulted = asyncio.Event()
        self._on_change: list[Callable[[], None]] = []
        self._on_recovered: list[Callable[[], Awaitable[bool]]] = []

    @property
    def writable(self) -> bool:
        return self.fault is None

    def on_change(self, fn: Callable[[], None]) -> None:
        """Call `fn` when the disk fails or recovers (the gate looks again)."""
        self._on_change.append(fn)

    def on_recovered(self, fn: Callable[[], Awaitable[bool]]) -> None:
        """Await `fn` once the disk takes writes again; False if it failed again meanwhile."""
        self._on_recovered.append(fn)

    async def io(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run `fn(*args, **kwargs)` on the I/O thread, off the event loop."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    async def record(self, fn: Callable[_P, Any], *args: _P.args, **kwargs: _P.kwargs) -> bool:
        """A state write whose failure must end neither the job's handling nor the daemon: on
        a full or failing disk the gate closes and False is returned."""
        try:
            await self.io(fn, *args, **kwargs)
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            self.failed(exc, getattr(fn, "__name__", "write"))
            return False
        return True

    def failed(self, exc: BaseException, doing: str) -> None:
        """The disk refused a write: the gate closes until a probe succeeds."""
        self._rec.note("state_write_failed")
        if self.fault is not None:
            return
        self.fault = f"{doing}: {type(exc).__name__}: {exc}"
        self._faulted.set()
        self._rec.log(
            "error",
            "state_disk_unavailable",
            doing=doing,
            error=f"{type(exc).__name__}: {exc}",
            state_dir=str(self._dir),
            what_to_do="free space on the state disk (or replace it); the agent retries "
            "every second and reopens the gate by itself",
        )
        for fn in self._on_change:
            fn()

    async def refusal(self) -> BaseException | None:
        """What the disk raises when tried, or None if it takes writes."""
        try:
            await self.io(self._probe, self._clock())
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            return exc
        return None

    async def watch(self) -> None:
        """The `state-probe` task: while the disk refuses, try it every PROBE_EVERY_S."""
        while True:
            await self._faulted.wait()
            await asyncio.sleep(PROBE_EVERY_S)
            if await self.refusal() is not None:
                continue
            was = self.fault
            filed = True
            for recovered in self._on_recovered:
                filed = await recovered() and filed
            if not filed:
                continue  # a write failed again while catching up: still faulty
            self.fault = None
            self._faulted.clear()
            self._rec.log("info", "state_disk_recovered", was=was)
            for fn in self._on_change:
                fn()

    def close(self) -> None:
        self._thread.shutdown(wait=True)
