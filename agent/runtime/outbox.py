"""The outbox: sealed results on disk, sent in order, each removed only once the broker
acknowledged it. A disconnect leaves the row for the next connection; the collector drops
a duplicate if a row was sent and not yet removed when the agent stopped.

The link runs `send` as the `outbox-sender` task of each connection, handing it the
connection's publish; the outbox never sees the client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from agent.core.lifecycle import Stage
from agent.kit.mqtt import is_connection_error
from agent.runtime.disk import PROBE_EVERY_S, StateDisk
from agent.runtime.journal import Journal
from agent.runtime.record import Recorder
from agent.state.jobs import JobStore
from agent.state.ledger import is_storage_error
from agent.wire.errors import Reason
from agent.wire.messages import EventKind

Publish = Callable[[str, bytes], Awaitable[None]]


class Outbox:
    def __init__(
        self,
        jobs: JobStore,
        disk: StateDisk,
        journal: Journal,
        recorder: Recorder,
        *,
        sent: Callable[[], None],
    ) -> None:
        self._jobs = jobs
        self._disk = disk
        self._journal = journal
        self._rec = recorder
        self._sent = sent  # a slot of the outbox freed (the work requester may ask again)
        self.depth = jobs.outbox_size()
        self._ready = asyncio.Event()
        self.changed = asyncio.Event()  # the depth changed (or the link did): look again

    def added(self) -> None:
        """A result was filed: wake the sender."""
        self.depth += 1
        self._ready.set()
        self.changed.set()

    def wake(self) -> None:
        self._ready.set()

    def _removed(self, n: int = 1) -> None:
        self.depth = max(0, self.depth - n)
        self._rec.metrics.outbox.set(self.depth)
        self.changed.set()

    async def send(self, publish: Publish) -> None:
        """Publish the outbox in order over one connection (the `outbox-sender` task)."""
        while True:
            if not self._disk.writable:  # rows cannot be removed once sent: wait
                await asyncio.sleep(PROBE_EVERY_S)
                continue
            damaged = self._jobs.damaged
            try:
                batch = await self._disk.io(self._jobs.outbox_batch)
            except Exception as exc:
                if not is_storage_error(exc):
                    raise
                self._disk.failed(exc, "reading the outbox")
                continue
            if self._jobs.damaged > damaged:
                lost = self._jobs.damaged - damaged
                self._removed(lost)
                self._rec.log(
                    "error",
                    "outbox_entries_damaged",
                    dropped=lost,
                    why="result file missing or cut short (power loss?); the fleet's lease "
                    "expiry sends those jobs elsewhere",
                )
            if not batch:
                self._ready.clear()
                await self._ready.wait()
                continue
            for seq, topic_name, payload, job_id, attempt in batch:
                key = (job_id, attempt)
                self._journal.restore(key, Stage.FILED)  # (or filed by an earlier run)
                try:
                    await publish(topic_name, payload)
                except Exception as exc:
                    if is_connection_error(exc):
                        raise  # the row stays and goes on the next connection
                    # This result only: it fails, the others go on.
                    self._rec.exception("result_not_published", job_id=job_id, attempt=attempt)
                    if await self._disk.record(self._jobs.outbox_remove, seq):
                        self._removed()
                    await self._journal.happened(
                        key,
                        EventKind.FAILED,
                        Reason.AGENT_ERROR.value,
                        f"publishing the result failed: {type(exc).__name__}: {exc}",
                        soon=False,
                    )
                    continue
                if not await self._disk.record(self._jobs.outbox_remove, seq):
                    break  # sent, not yet removed: the collector drops the duplicate later
                self._removed()
                # "succeeded" once the broker holds the result, not before.
                await self._journal.happened(key, EventKind.SUCCEEDED, soon=False)
            self._sent()
