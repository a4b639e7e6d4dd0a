"""The executor: accepted jobs in order, one computing at a time, the next staged behind it
in the worker, compute stopped at once when the car needs it back.

Tasks:
  job-executor   takes queued jobs one at a time; each runs as a `job:<id>` task in the
                 executor's own TaskGroup (so a preemption can cancel it), with its
                 compute as a `compute:<id>` task beside it;
  worker-reaper  stops a worker left idle for agent.worker_idle_s.

A job that killed the worker twice is poison here (`crashes`, read by intake). A worker
killed from outside (OOM killer, an operator) or one that cannot start hands the job back
without a strike. A preemption hands it back too: the car coming first never costs a job
its attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.core.admission import HeldModel
from agent.core.intake import MAX_WORKER_CRASHES, SHUTDOWN
from agent.inference.engine import WorkerEngine
from agent.runtime.energy import JobEnergy
from agent.runtime.journal import Journal
from agent.runtime.models import Shelf
from agent.runtime.record import Recorder
from agent.wire.errors import Reason, WireError
from agent.wire.messages import EventKind, JobSpec
from agent.wire.tensors import Tensor

WORKER_FAILURES_BEFORE_BACKOFF = 2
WORKER_BACKOFF_S = 5.0
WORKER_BACKOFF_CAP_S = 600.0

REAP_EVERY_S = 1.0

Key = tuple[str, int]


@dataclass(frozen=True, slots=True)
class AcceptedJob:
    job: JobSpec
    model: HeldModel
    digest: str  # sha256 of what the fleet signed; binds the sealed result

    @property
    def key(self) -> Key:
        return (self.job.job_id, self.job.attempt)

    @property
    def request(self) -> str:
        """The worker's name for this job's request."""
        return f"{self.job.job_id}#{self.job.attempt}"


@dataclass(frozen=True, slots=True)
class Finished:
    item: AcceptedJob
    outputs: dict[str, Tensor]
    runtime_ms: float
    energy_wh: float


def _key_of(request: str | None) -> Key | None:
    if request is None:
        return None
    job_id, _, attempt = request.rpartition("#")
    return (job_id, int(attempt))


class Executor:
    def __init__(
        self,
        engine: WorkerEngine,
        shelf: Shelf,
        journal: Journal,
        energy: JobEnergy,
        recorder: Recorder,
        *,
        capacity: int,
        gate_open: Callable[[], bool],
        stopping: Callable[[], bool],
        finished: Callable[[Finished], Awaitable[None]],
        slot_freed: Callable[[], None],
    ) -> None:
        self._engine = engine
        self._shelf = shelf
        self._journal = journal
        self._energy = energy
        self._rec = recorder
        self.capacity = capacity
        self._gate_open = gate_open
        self._stopping = stopping
        self._finished = finished
        self._slot_freed = slot_freed
        self._queue: deque[AcceptedJob] = deque()
        self._arrived = asyncio.Event()
        self.crashes: Counter[str] = Counter()  # job id -> times it killed the worker
        self._current: tuple[AcceptedJob, asyncio.Task[None]] | None = None
        self.idle = asyncio.Event()
        self.job_running = asyncio.Event()
        self._preempt_reason = ""
        # A worker that cannot start (a broken onnxruntime, no memory): jobs are handed back,
        # and after the second failure in a row no new work is asked for until this time
        # (monotonic), 5 s doubling to 10 min, so that the car does not spin taking and
        # returning jobs every 2 s.
        self._worker_failures = 0
        self.worker_retry_at = 0.0
        self._preempted: AcceptedJob | None = None  # the job whose compute we stopped

    # ---- what others read ---------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def current(self) -> JobSpec | None:
        return self._current[0].job if self._current else None

    def running_key(self) -> Key | None:
        return self._current[0].key if self._current else None

    def has_slot(self) -> bool:
        return len(self._queue) < self.capacity

    def busy_slots(self) -> int:
        return len(self._queue) + (1 if self._current else 0)

    # ---- in -------------------------------------------------------------------

    def submit(self, item: AcceptedJob) -> None:
        """Queue an accepted job (intake checked there is a slot)."""
        self._queue.append(item)
        self._arrived.set()

    async def stage_next(self) -> None:
        """Hand the worker the next queued job behind the running one, so it starts the moment
        the worker is free (engine.stage); only while the gate is open."""
        if self._current is None or not self._gate_open() or self._stopping() or not self._queue:
            return
        nxt = self._queue[0]  # peek, not take
        await self._engine.stage(
            nxt.request, nxt.model, self._shelf.path_of(nxt.model), nxt.job.inputs
        )

    def take_queued(self) -> list[AcceptedJob]:
        """Everything accepted and not started (shutdown hands these back)."""
        items = list(self._queue)
        self._queue.clear()
        return items

    # ---- the car first --------------------------------------------------------

    def preempt(self, reason: str) -> None:
        """Stop compute now (also a staged job's), and hand the running job back."""
        if self._current is not None or self._engine.has_work:
            self._engine.kill()  # compute stops here, before anything else
        if self._current is not None:
            self._preempt_reason = reason
            self._preempted = self._current[0]
            self._current[1].cancel()

    async def finish_running(self, grace_s: float) -> None:
        """Shutdown: let the running job finish within `grace_s`, else preempt it."""
        if self._current is None:
            return
        _, task = self._current
        done, _ = await asyncio.wait({task}, timeout=grace_s)
        if not done:
            self.preempt(SHUTDOWN)

    # ---- tasks -----------------------------------------------------------------

    async def run(self) -> None:
        """The `job-executor` task."""
        async with asyncio.TaskGroup() as jobs:
            while True:
                self.idle.set()
                while not self._queue:
                    self._arrived.clear()
                    await self._arrived.wait()
                item = self._queue.popleft()
                self.idle.clear()
                try:
                    await self._execute_one(item, jobs)
                except Exception as exc:  # one job never ends the daemon: it fails, typed
                    self._rec.exception("job_handling_failed", job_id=item.job.job_id)
                    await self._journal.happened(
                        item.key,
                        EventKind.FAILED,
                        Reason.AGENT_ERROR.value,
                        f"the agent failed running this job: {type(exc).__name__}: {exc}",
                    )

    async def reap(self) -> None:
        """The `worker-reaper` task."""
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            if self._current is None:
                await self._engine.stop_if_idle(time.monotonic())

    # ---- one job ----------------------------------------------------------------

    async def _execute_one(self, item: AcceptedJob, jobs: asyncio.TaskGroup) -> None:
        key = item.key
        if not self._gate_open() or self._stopping():
            if self._engine.has_work:
                self._engine.kill()  # this job may have been staged: it must not compute
            reason = Reason.GATE_CLOSED.value if not self._gate_open() else SHUTDOWN
            if self._energy.computing == key:  # it was staged
                await self._energy.close(key, "released")
            await self._journal.happened(key, EventKind.RELEASED, reason, "not started")
            return
        self._energy.start(key)
        run = jobs.create_task(self._run_job(item, jobs), name=f"job:{item.job.job_id}")
        self._current = (item, run)
        self.job_running.set()
        try:
            await asyncio.wait({run})
        finally:
            if not run.done():
                run.cancel()
            self._current = None
            self._preempted = None
            self.job_running.clear()
        if run.cancelled():
            await self._energy.close(key, "preempted")  # the worker was killed: nothing computes
            await self._journal.happened(
                key, EventKind.PREEMPTED, self._preempt_reason, "compute stopped; job handed back"
            )
        self._energy.forget(key)
        self._slot_freed()

    async def _compute(self, item: AcceptedJob) -> dict[str, Tensor] | Exception:
        """The worker's run of `item`: its outputs, or its failure as a value (never raised,
        so the executor's TaskGroup is not torn down by one job)."""
        try:
            return await self._engine.run(
                item.model,
                self._shelf.path_of(item.model),
                item.job.inputs,
                deadline_s=item.job.limits.max_runtime_s,
                key=item.request,
            )
        except Exception as exc:
            return exc

    async def _run_job(self, item: AcceptedJob, jobs: asyncio.TaskGroup) -> None:
        """One job's task: never raises but its cancellation, so one job's fault fails that
        job and not the executor's TaskGroup."""
        try:
            await self._run_job_steps(item, jobs)
        except Exception as exc:
            self._rec.log("error", "job_crashed", job_id=item.job.job_id, error=repr(exc))
            try:
                await self._energy.close(item.key, "failed")
                await self._journal.happened(
                    item.key,
                    EventKind.FAILED,
                    Reason.AGENT_ERROR.value,
                    f"the agent failed running this job: {type(exc).__name__}: {exc}",
                )
            except Exception:
                self._rec.exception("job_failure_not_reported", job_id=item.job.job_id)

    async def _run_job_steps(self, item: AcceptedJob, jobs: asyncio.TaskGroup) -> None:
        job, key = item.job, item.key
        started = time.perf_counter()
        # Compute starts first; the journal entry and the running event follow while it runs,
        # so the worker does not wait on a disk write and a broker round trip between jobs.
        compute = jobs.create_task(self._compute(item), name=f"compute:{job.job_id}")
        try:
            await asyncio.sleep(0)  # let the run write its request (or find it staged)
            await self.stage_next()  # before the journal: its write may queue behind sealing
            await self._journal.happened(key, EventKind.RUNNING)
            await asyncio.wait({compute})
        except BaseException:  # cancelled: preempted, or the agent is stopping
            compute.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await compute
            raise
        outcome = compute.result()
        if isinstance(outcome, WireError):
            await self._failed(item, outcome)
            return
        if isinstance(outcome, Exception):
            raise outcome
        self._worker_failures = 0
        runtime_ms = (time.perf_counter() - started) * 1000
        self._rec.metrics.job_seconds.observe(runtime_ms / 1000)
        energy_wh = self._energy.book(key, self._next_computing(item))
        # Compute is done: sealing and publishing overlap with the next job's compute.
        await self._finished(Finished(item, outcome, runtime_ms, energy_wh))

    async def _failed(self, item: AcceptedJob, err: WireError) -> None:
        job, key = item.job, item.key
        if self._preempted is item:
            # We killed its worker. Our cancellation can be lost on the way (Python 3.11's
            # wait_for, inside aiomqtt's publish, returns a result that arrived with it),
            # but the job was preempted, not crashed: never a strike towards poison.
            raise asyncio.CancelledError
        if err.reason is Reason.WORKER_UNAVAILABLE:
            self._worker_unavailable(err.detail)
        if err.reason in (Reason.WORKER_KILLED, Reason.WORKER_UNAVAILABLE):
            # Not the job's fault: handed back, no strike, no attempt used at the fleet.
            await self._energy.close(key, "released")
            await self._journal.happened(
                key, EventKind.RELEASED, err.reason.value, f"{err.detail}; job handed back"
            )
            return
        detail = err.detail
        if err.reason in (Reason.WORKER_CRASHED, Reason.MEMORY_LIMIT):
            self.crashes[job.job_id] += 1
            if self.crashes[job.job_id] >= MAX_WORKER_CRASHES:
                detail += "; this job has now killed the worker twice and is not run here again"
        await self._energy.close(key, "failed", self._next_computing(item))
        await self._journal.happened(key, EventKind.FAILED, err.reason.value, detail)

    def _worker_unavailable(self, detail: str) -> None:
        self._worker_failures += 1
        if self._worker_failures < WORKER_FAILURES_BEFORE_BACKOFF:
            return
        wait_s = min(
            WORKER_BACKOFF_CAP_S,
            WORKER_BACKOFF_S * 2 ** (self._worker_failures - WORKER_FAILURES_BEFORE_BACKOFF),
        )
        self.worker_retry_at = time.monotonic() + wait_s
        self._rec.log(
            "error",
            "worker_unavailable",
            failures_in_a_row=self._worker_failures,
            detail=detail,
            asking_for_work_again_in_s=wait_s,
            fix="check onnxruntime with: /opt/edge-agent/bin/python -c 'import onnxruntime'",
        )

    def worker_may_start(self) -> bool:
        """False while backing off after the worker failed to start twice or more in a row."""
        return time.monotonic() >= self.worker_retry_at

    def _next_computing(self, item: AcceptedJob) -> Key | None:
        """The job the worker went on to after `item` (staged behind it), if any."""
        nxt = self._engine.computing
        return _key_of(nxt) if nxt is not None and nxt != item.request else None
