"""Intake: job messages and trust policy updates from the link, decided by the pure
`agent.core.intake.intake` and acted on here.

For an admitted job, the replay record and the raised clock floor are written durably
before anything else: a replay after a crash is still caught. A job that cannot be
recorded (the state disk refuses) is handed back, never run. An accepted job goes to the
executor. The `replay-prune` task forgets job ids whose jobs have expired: they would be
refused as expired anyway.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Mapping

from agent import BUILT_ON
from agent.config import AgentConfig
from agent.core.admission import HeldModel
from agent.core.clock import start_floor, trusted_now
from agent.core.gate import GateReason
from agent.core.intake import IntakeContext, Outcome, Verdict, intake
from agent.core.lifecycle import Stage
from agent.core.trust import Trust
from agent.runtime.disk import StateDisk
from agent.runtime.executor import AcceptedJob, Executor
from agent.runtime.journal import Journal
from agent.runtime.record import Recorder
from agent.state.jobs import JobStore
from agent.wire.errors import Reason, WireError
from agent.wire.hints import WorkHint, verify_hint
from agent.wire.messages import EventKind

PRUNE_EVERY_S = 600.0


class Intake:
    def __init__(
        self,
        config: Callable[[], AgentConfig],
        *,
        trust: Trust,
        jobs: JobStore,
        disk: StateDisk,
        journal: Journal,
        executor: Executor,
        recorder: Recorder,
        models: Callable[[], Mapping[str, HeldModel]],
        gate_open: Callable[[], bool],
        stopping: Callable[[], bool],
        trust_changed: Callable[[], None],
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self.trust = trust
        self._jobs = jobs
        self._disk = disk
        self._journal = journal
        self._executor = executor
        self._rec = recorder
        self._models = models
        self._gate_open = gate_open
        self._stopping = stopping
        self._trust_changed = trust_changed
        self._clock = clock
        # The replay record, with expiries: durable in the state database, mirrored here.
        self.seen: dict[tuple[str, int], float] = jobs.load_seen(clock())
        held = trust.policy
        self.clock_floor = start_floor(
            jobs.clock_floor(),
            held.policy.issued_at if held is not None else None,
            dt.datetime.fromisoformat(BUILT_ON).replace(tzinfo=dt.UTC).timestamp(),
        )

    def _local_now(self) -> float:
        """The system clock, counted when it reads behind the floor."""
        now = self._clock()
        if now < self.clock_floor:
            self._rec.note("clock_behind_floor")
        return now

    def trusted_now(self) -> float:
        """The system clock, but never earlier than the latest signed issue time seen: a clock
        set backwards does not make expired jobs valid again."""
        return trusted_now(self._local_now(), self.clock_floor)

    # ---- jobs ------------------------------------------------------------------

    def context(self) -> IntakeContext:
        """What the pure intake needs to know now."""
        config = self._config()
        agent, owner = config.agent, config.owner
        return IntakeContext(
            vehicle_id=config.vehicle.id,
            local_now=self._local_now(),
            clock_floor=self.clock_floor,
            trust=self.trust,
            max_message_bytes=agent.max_message_bytes,
            max_clock_skew_s=agent.max_clock_skew_s,
            max_input_bytes=agent.max_input_bytes,
            seen=self.seen,
            models=self._models(),
            crashes=self._executor.crashes,
            gate_open=self._gate_open(),
            stopping=self._stopping(),
            has_slot=self._executor.has_slot(),
            accepted_issuers=frozenset(owner.accepted_issuers),
            accepted_classes=frozenset(owner.accepted_job_classes),
        )

    def hint_message(self, raw: bytes) -> WorkHint | None:
        """A work hint from the fleet, verified like a job's signature; None (counted, logged)
        if it is not one this vehicle should heed."""
        config = self._config()
        try:
            return verify_hint(
                raw,
                trusted=self.trust.ring,
                vehicle_id=config.vehicle.id,
                now=self.trusted_now(),
                max_skew_s=config.agent.max_clock_skew_s,
            )
        except WireError as err:
            self._rec.note(
                "hints_refused",
                "work_hint_refused",
                "warning",
                reason=err.reason.value,
                detail=err.detail,
            )
            return None

    async def job_message(self, raw: bytes) -> None:
        """One job message: decide, record, act. Never raises for a message's sake."""
        verdict = intake(raw, self.context())
        if verdict.error is not None:
            self._rec.log(
                "error",
                "job_intake_failed",
                job_id=verdict.job.job_id if verdict.job else None,
                detail=verdict.detail,
                exc_info=verdict.error,
            )
        try:
            await self._act(verdict)
        except Exception as exc:
            job = verdict.job
            key = (job.job_id, job.attempt) if job else None
            if key is not None and self._journal.stage(key) is not Stage.ARRIVING:
                self._rec.exception("job_intake_failed_after_accept", job_id=key[0])
                return
            self._rec.exception("job_intake_failed", stage="act", job_id=key[0] if key else None)
            await self._rec.job(
                key,
                EventKind.REJECTED,
                Reason.AGENT_ERROR.value,
                f"the agent failed at accept: {type(exc).__name__}: {exc}",
            )

    async def _act(self, verdict: Verdict) -> None:
        job = verdict.job
        if not verdict.admitted or job is None:
            key = (job.job_id, job.attempt) if job else None
            await self._rec.job(key, EventKind.REJECTED, verdict.reason, verdict.detail)
            return
        key = (job.job_id, job.attempt)
        accept = verdict.outcome is Outcome.ACCEPT
        assert verdict.clock_floor is not None
        self.seen[key] = job.expires_at
        self.clock_floor = verdict.clock_floor
        # Durable before anything is acted on: a replay after a crash is still caught.
        recorded = await self._disk.record(
            self._jobs.remember,
            job.job_id,
            job.attempt,
            job.expires_at,
            accepted=accept,
            now=self._clock(),
            clock_floor=verdict.clock_floor,
        )
        if not recorded:  # not durably recorded, so not run: the fleet sends it elsewhere
            await self._journal.happened(
                key,
                EventKind.RELEASED,
                GateReason.STATE_DISK.value,
                "the state disk refuses writes; the job was not recorded and is not run here",
                soon=False,
            )
            return
        if verdict.outcome is Outcome.REJECT:
            await self._journal.happened(
                key, EventKind.REJECTED, verdict.reason, verdict.detail, soon=False
            )
        elif verdict.outcome is Outcome.RELEASE:
            await self._journal.happened(
                key, EventKind.RELEASED, verdict.reason, verdict.detail, soon=False
            )
        else:
            assert verdict.model is not None
            # Queued before its event is sent: compute need not wait for the broker's ack.
            self._journal.accepted(key)
            self._executor.submit(AcceptedJob(job, verdict.model, verdict.digest))
            await self._rec.job(key, EventKind.ACCEPTED)
            await self._executor.stage_next()

    # ---- trust policy --------------------------------------------------------------

    async def policy_message(self, raw: bytes) -> None:
        """A trust policy from the fleet: held from now on if the held one's roots admit it."""
        if not raw:
            return  # the retained policy was cleared: keep holding the one we have
        held = self.trust.policy
        try:
            new = self.trust.update(raw, self.trusted_now())
        except WireError as err:
            self._rec.note(
                f"policy_rejected.{err.reason.value}",
                "trust_policy_rejected",
                "warning",
                reason=err.reason.value,
                detail=err.detail,
                held_version=held.version if held else None,
            )
            return
        if new is None:
            return  # the retained copy of the policy already held, redelivered on connect
        await self._disk.record(self._jobs.save_policy, new.version, new.raw)
        self._rec.metrics.policy_version.set(new.version)
        self._rec.note(
            "policy_accepted",
            "trust_policy_updated",
            version=new.version,
            previous=held.version if held else None,
            expires_at=new.policy.expires_at,
            job_keys=len(new.policy.job_keys),
        )
        self._trust_changed()

    # ---- the replay record ---------------------------------------------------------

    async def prune(self) -> None:
        """Forget job ids whose jobs have expired."""
        now = self.trusted_now()
        for key in [k for k, expires in self.seen.items() if expires < now]:
            del self.seen[key]
        await self._disk.record(self._jobs.prune_seen, now)

    async def run(self) -> None:
        """The `replay-prune` task."""
        while True:
            await asyncio.sleep(PRUNE_EVERY_S)
            await self.prune()
