"""The jobs this vehicle holds, moved through the lifecycle table (agent.core.lifecycle).

Every room that ends or advances a job calls `Journal.happened`: the table says what the
durable journal writes (JobStore), the held set follows, and the event goes through the
recorder to the wire. Nothing else writes a job's journal entry or sends its event, so
the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from agent.core.lifecycle import Journal as Step
from agent.core.lifecycle import LifecycleError, Stage, advance
from agent.core.lifecycle import Step as Transition
from agent.runtime.disk import StateDisk
from agent.runtime.record import Recorder
from agent.state.jobs import JobStore
from agent.wire.messages import EventKind

Key = tuple[str, int]  # (job id, attempt)


class Journal:
    def __init__(
        self, jobs: JobStore, disk: StateDisk, recorder: Recorder, clock: Callable[[], float]
    ) -> None:
        self._jobs = jobs
        self._clock = clock
        self._disk = disk
        self._rec = recorder
        self._stages: dict[Key, Stage] = {}
        # Jobs an earlier run accepted and never finished: handed back on the first connect.
        self._interrupted = jobs.interrupted()

    def held(self) -> Iterator[Key]:
        """The jobs accepted here and not yet ended (what heartbeats name)."""
        return (k for k, s in list(self._stages.items()) if s in (Stage.ACCEPTED, Stage.RUNNING))

    def stage(self, key: Key) -> Stage:
        return self._stages.get(key, Stage.ARRIVING)

    def _step(self, key: Key, happening: str) -> Step:
        stage = self.stage(key)
        try:
            step = advance(stage, happening)
        except LifecycleError as err:  # our bug: said loudly, and the job still ends
            self._rec.log(
                "error", "lifecycle_violation", job_id=key[0], attempt=key[1], error=str(err)
            )
            step = Transition(Stage.DONE, Step.FINISH)
        if step.to is Stage.DONE:
            self._stages.pop(key, None)
        else:
            self._stages[key] = step.to
        return step.journal

    async def happened(
        self,
        key: Key,
        kind: EventKind,
        reason: str | None = None,
        detail: str = "",
        *,
        soon: bool = True,
    ) -> None:
        """`kind` happened to the job `key`: journal it as the table says, then send it."""
        journal = self._step(key, kind)
        if journal is Step.MARK_RUNNING:
            await self._disk.record(self._jobs.mark, key[0], key[1], "running", self._clock())
        elif journal is Step.FINISH:
            await self._disk.record(self._jobs.finish, key[0], key[1])
        if soon:
            await self._rec.job_soon(key, kind, reason, detail)
        else:
            await self._rec.job(key, kind, reason, detail)

    def accepted(self, key: Key) -> None:
        """The job is held from now on (the replay write journalled it); its event is sent by
        the caller right after queueing it, so the executor may run it meanwhile."""
        self._step(key, EventKind.ACCEPTED)

    def restore(self, key: Key, stage: Stage) -> None:
        """A job an earlier run left at `stage` (its journal entry, or its result in the
        outbox): the outbox and the journal outlive the process."""
        self._stages.setdefault(key, stage)

    def filed(self, key: Key) -> None:
        """The result is sealed and in the outbox; its journal entry closed in that write
        (JobStore.finish_with_result, which the results room makes)."""
        self._step(key, "filed")

    async def hand_back_interrupted(self) -> None:
        """Hand back the jobs a previous run accepted and never finished (once, on connect)."""
        interrupted, self._interrupted = self._interrupted, []
        for job_id, attempt, state in interrupted:
            key = (job_id, attempt)
            self._rec.log(
                "warning", "job_interrupted_by_restart", job_id=job_id, attempt=attempt, state=state
            )
            self.restore(key, Stage.RUNNING if state == "running" else Stage.ACCEPTED)
            await self.happened(
                key,
                EventKind.RELEASED,
                "agent_restarted",
                f"the agent restarted while the job was {state}",
                soon=False,
            )
