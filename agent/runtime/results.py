"""Results: each finished job sealed to its requester, signed, its energy booked, and filed
to the outbox in one write, off the executor's path (the `result-publisher` task).

A full or failing state disk keeps finished results in memory, in order, and files them
when the disk takes writes again (`refile`, called by the state disk's probe). A result
that cannot be sealed fails its job, typed, and only it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.runtime.disk import StateDisk
from agent.runtime.energy import JobEnergy
from agent.runtime.executor import Finished
from agent.runtime.journal import Journal
from agent.runtime.outbox import Outbox
from agent.runtime.record import Recorder
from agent.state.jobs import JobStore
from agent.state.ledger import EnergyLedger, is_storage_error
from agent.wire.bundle import encode_result_body, sign_result
from agent.wire.errors import Reason, WireError
from agent.wire.keys import sealable_x25519_public
from agent.wire.messages import SUITE, EventKind, ResultBody, SealedResult
from agent.wire.sealing import result_info, seal
from agent.wire.topics import Channel, topic


class Results:
    def __init__(
        self,
        vehicle_id: str,
        signing_key: Ed25519PrivateKey,
        *,
        jobs: JobStore,
        ledger: EnergyLedger,
        disk: StateDisk,
        energy: JobEnergy,
        journal: Journal,
        outbox: Outbox,
        recorder: Recorder,
        capacity: int,
        clock: Callable[[], float],
    ) -> None:
        self.vehicle_id = vehicle_id
        self._key = signing_key
        self._jobs = jobs
        self._ledger = ledger
        self._disk = disk
        self._energy = energy
        self._journal = journal
        self._outbox = outbox
        self._rec = recorder
        self._clock = clock
        self._deliveries: asyncio.Queue[Finished] = asyncio.Queue(maxsize=capacity)
        self._unfiled: list[Finished] = []  # finished while the disk refused writes

    async def put(self, done: Finished) -> None:
        """A finished job, from the executor."""
        await self._deliveries.put(done)

    async def flushed(self) -> None:
        """Every finished job handed over so far is filed (or held, the disk refusing)."""
        await self._deliveries.join()

    async def run(self) -> None:
        """The `result-publisher` task: file finished jobs, in order."""
        while True:
            done = await self._deliveries.get()
            try:
                if self._unfiled:  # the disk is refusing: keep the order, file them together
                    self._unfiled.append(done)
                else:
                    await self._file(done)
            finally:
                self._deliveries.task_done()

    async def refile(self) -> bool:
        """The disk takes writes again: file what was held. False if it refused again."""
        held, self._unfiled = self._unfiled, []
        for i, done in enumerate(held):
            if not await self._file(done):
                self._unfiled = held[i:] if not self._unfiled else self._unfiled + held[i + 1 :]
                return False
        if held:
            self._rec.log("info", "held_results_filed", results=len(held))
        return True

    async def _file(self, done: Finished) -> bool:
        """Seal, sign and put one finished job in the outbox. A disk that refuses keeps the
        result in memory (False); any other failure fails that job, typed, and only it."""
        job = done.item.job
        try:
            await self._disk.io(self._file_result, done, self._energy.day, self._energy.today_wh)
        except WireError as err:  # the result cannot be sealed: the job fails, typed
            await self._filing_failed(done, err.reason.value, err.detail)
            return True
        except Exception as exc:
            if is_storage_error(exc):
                self._disk.failed(exc, "filing a result")
                self._unfiled.append(done)
                return False
            self._rec.exception("result_not_filed", job_id=job.job_id, attempt=job.attempt)
            await self._filing_failed(
                done,
                Reason.AGENT_ERROR.value,
                f"sealing or filing the result failed: {type(exc).__name__}: {exc}",
            )
            return True
        self._journal.filed(done.item.key)
        self._outbox.added()
        return True

    async def _filing_failed(self, done: Finished, reason: str, detail: str) -> None:
        """A finished job whose result cannot be filed: it fails, its energy is kept as such."""
        await self._energy.keep(done.item.key, done.energy_wh, "failed")
        await self._journal.happened(done.item.key, EventKind.FAILED, reason, detail)

    def _file_result(self, done: Finished, day: str, day_wh: float) -> None:
        """On the I/O thread, in one go: seal and sign the job's result, book its energy, and
        put the result in the outbox as its journal entry closes. Sealing comes first: a
        result that cannot be sealed leaves no `succeeded` row behind."""
        job = done.item.job
        sealed = self.seal(done)
        self._ledger.record_job(
            job.job_id, job.attempt, day, done.energy_wh, self._clock(), "succeeded", day_wh
        )
        self._jobs.finish_with_result(
            job.job_id,
            job.attempt,
            topic(self.vehicle_id, Channel.RESULTS),
            sealed,
            self._clock(),
        )

    def seal(self, done: Finished) -> bytes:
        """The signed, sealed result of `done`: only its requester can open it."""
        item, job = done.item, done.item.job
        body = ResultBody(
            job_id=job.job_id,
            attempt=job.attempt,
            vehicle_id=self.vehicle_id,
            model_sha256=item.model.sha256,
            outputs=done.outputs,
            runtime_ms=done.runtime_ms,
            finished_at=self._clock(),
            energy_wh=done.energy_wh,
        )
        info = result_info(job.job_id, job.attempt, self.vehicle_id, item.digest)
        try:
            requester = sealable_x25519_public(job.requester_key)
        except ValueError as exc:  # admission refuses these: this is the last line of defence
            raise WireError(Reason.BAD_REQUESTER_KEY, str(exc)) from None
        ciphertext = seal(encode_result_body(body), requester, info)
        sealed = SealedResult(
            job_id=job.job_id,
            attempt=job.attempt,
            vehicle_id=self.vehicle_id,
            job_digest=item.digest,
            suite=SUITE,
            ciphertext=ciphertext,
        )
        return sign_result(sealed, self._key)
