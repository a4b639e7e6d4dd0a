"""One path for what happens: a chain of processors, in the style of structlog's.

Every happening of note (a job's event, a reconnect, a dropped message, a refused write)
goes through `Recorder`: the chain counts it (the `counts` that `edge-agent status` shows),
measures it (the Prometheus instruments), logs it, and hands it to whoever watches (tests,
benchmarks); a job's event is then published on the vehicle's events topic. Rooms call it
instead of touching counts, metrics and the log each time.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agent.kit.logs import get_logger
from agent.runtime.metrics import AgentMetrics
from agent.wire.messages import EventKind, JobEvent

EVENT_SOON_S = 5.0  # how long an event may hold up compute or shutdown while the broker is away


@dataclass(frozen=True, slots=True)
class Happening:
    """One thing that happened. `name` is what is counted (None: logged only)."""

    name: str | None
    event: str | None = None  # the log line's event name (None: not logged)
    level: str = "info"
    kind: EventKind | None = None  # a job's event, published on the wire
    job: tuple[str, int] | None = None
    reason: str | None = None
    detail: str = ""
    fields: dict[str, Any] = field(default_factory=dict)


Processor = Callable[[Happening], None]
EventSink = Callable[[JobEvent], Awaitable[None]]


def _instrument(metrics: AgentMetrics, name: str) -> Any:
    """The Prometheus instrument a counted happening moves, if any."""
    if name.startswith("policy_rejected."):
        return metrics.policies.labels(outcome=name.removeprefix("policy_rejected."))
    return {
        "reconnects": metrics.reconnects,
        "inbound_dropped": metrics.inbound_dropped,
        "oversized_packets": metrics.oversized_packets,
        "state_write_failed": metrics.state_write_failures,
        "policy_accepted": metrics.policies.labels(outcome="accepted"),
    }.get(name)


class Recorder:
    def __init__(self, vehicle_id: str, metrics: AgentMetrics, clock: Callable[[], float]) -> None:
        self.vehicle_id = vehicle_id
        self.metrics = metrics
        self.counts: Counter[str] = Counter()
        self._log = get_logger(vehicle_id=vehicle_id)
        self._clock = clock
        self._sink: EventSink | None = None
        self._unpublished: frozenset[EventKind] = frozenset()
        self._chain: list[Processor] = [self._count, self._measure, self._write_log]

    # ---- the chain ---------------------------------------------------------

    def _count(self, h: Happening) -> None:
        if h.name is None:
            return
        self.counts[h.name] += 1
        if h.kind is not None and h.reason:
            self.counts[f"{h.name}:{h.reason}"] += 1

    def _measure(self, h: Happening) -> None:
        if h.kind is not None:
            self.metrics.jobs.labels(kind=h.kind.value, reason=h.reason or "").inc()
        elif h.name is not None and (instrument := _instrument(self.metrics, h.name)):
            instrument.inc()

    def _write_log(self, h: Happening) -> None:
        if h.event is None:
            return
        ids = {"job_id": h.job[0], "attempt": h.job[1]} if h.job else {}
        extra = {"reason": h.reason, "detail": h.detail or None} if h.kind is not None else {}
        getattr(self._log, h.level)(h.event, **extra, **ids, **h.fields)

    def watch(self, processor: Processor) -> Callable[[], None]:
        """Add `processor` at the end of the chain; returns what removes it."""
        self._chain.append(processor)
        return lambda: self._chain.remove(processor)

    def connect(self, sink: EventSink, *, unpublished: frozenset[EventKind] = frozenset()) -> None:
        """Where job events go on the wire (the link's publish, waiting through outages);
        events of the `unpublished` kinds are recorded here only (the lean per-job path)."""
        self._sink = sink
        self._unpublished = unpublished

    def _run(self, h: Happening) -> None:
        for processor in list(self._chain):
            processor(h)

    # ---- what rooms call --------------------------------------------------

    def note(self, name: str, event: str | None = None, level: str = "info", **fields: Any) -> None:
        """Count `name` (and its instrument); log `event` with `fields` if given."""
        self._run(Happening(name, event, level, fields=fields))

    def log(self, level: str, event: str, **fields: Any) -> None:
        """A log line only, through the same chain."""
        self._run(Happening(None, event, level, fields=fields))

    def exception(self, event: str, **fields: Any) -> None:
        """A log line with the traceback of the exception being handled."""
        self._log.exception(event, **fields)

    async def job(
        self,
        job: tuple[str, int] | None,
        kind: EventKind,
        reason: str | None = None,
        detail: str = "",
    ) -> None:
        """A job's happening (known by its id and attempt, or none): counted, measured,
        logged, watched, and published on the events topic."""
        level = "warning" if kind in (EventKind.REJECTED, EventKind.FAILED) else "info"
        self._run(Happening(kind.value, f"job_{kind.value}", level, kind, job, reason, detail))
        if self._sink is None or kind in self._unpublished:
            return
        ids = {"job_id": job[0], "attempt": job[1]} if job else {}
        event = JobEvent(
            vehicle_id=self.vehicle_id,
            kind=kind,
            reason=reason,
            detail=detail[:500],
            at=self._clock(),
            **ids,  # type: ignore[arg-type]
        )
        await self._sink(event)

    async def job_soon(
        self,
        job: tuple[str, int],
        kind: EventKind,
        reason: str | None = None,
        detail: str = "",
    ) -> None:
        """An event that must not hold up compute or shutdown for long if the broker is away."""
        try:
            async with asyncio.timeout(EVENT_SOON_S):
                await self.job(job, kind, reason, detail)
        except TimeoutError:
            self.log("warning", "event_not_sent", job_id=job[0], kind=kind.value)
