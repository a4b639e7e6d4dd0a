"""Energy, booked to the job that used it: every interval of compute power goes to the job
the worker was computing then, and each job's total is kept in the ledger with its outcome.

The `energy-save` task keeps the day's total on disk every few seconds while jobs run, so
a crash loses at most that much of the owner's daily allowance accounting.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable

from agent.core.energy import EnergyMeter
from agent.runtime.disk import StateDisk
from agent.state.ledger import EnergyLedger
from agent.vehicle.snapshot import VehicleSnapshot

SAVE_EVERY_S = 5.0

Key = tuple[str, int]  # (job id, attempt)


class JobEnergy:
    def __init__(
        self,
        ledger: EnergyLedger,
        disk: StateDisk,
        local: Callable[[float], dt.datetime],
        clock: Callable[[], float],
        look: Callable[[float], VehicleSnapshot],
    ) -> None:
        self._ledger = ledger
        self._disk = disk
        self._local = local
        self._clock = clock
        today = local(clock()).date().isoformat()
        self.meter = EnergyMeter(day=today, today_wh=ledger.day_total(today))
        self.computing: Key | None = None  # the job whose compute the worker is doing
        self._booked: set[Key] = set()
        self._look = look  # a fresh look at the car that also closes the power room's window

    @property
    def day(self) -> str:
        return self.meter.day

    @property
    def today_wh(self) -> float:
        return self.meter.today_wh

    def job_wh(self, key: Key) -> float:
        return self.meter.job_wh(key)

    def sample(self, now: float, snap: VehicleSnapshot) -> None:
        """One reading of the car: the interval since the last goes to the computing job."""
        self.meter.sample(
            now,
            snap.compute_power_w,
            self._local(now).date().isoformat(),
            self.computing,
            snap.compute_energy_j,
        )

    def boundary(self, job: Key | None) -> None:
        """A sample at a job's start or end: the interval up to now is booked to `job`."""
        now = self._clock()
        snap = self._look(now)
        self.meter.sample(
            now,
            snap.compute_power_w,
            self._local(now).date().isoformat(),
            job,
            snap.compute_energy_j,
        )

    def start(self, key: Key) -> None:
        """The worker starts computing `key` (unless it already is, staged behind the last)."""
        if self.computing != key:
            self.boundary(self.computing)
            self.computing = key

    def book(self, key: Key, next_computing: Key | None) -> float:
        """Close the job's account at its end: what ran up to now is booked to it, and what
        runs from now on to `next_computing`, the job the worker already went on to."""
        if key in self._booked:
            return self.meter.job_wh(key)
        self._booked.add(key)
        self.boundary(key)
        self.computing = next_computing if next_computing != key else None
        return self.meter.close_job(key)

    def forget(self, key: Key) -> None:
        self._booked.discard(key)

    async def keep(self, key: Key, wh: float, outcome: str) -> None:
        """Write a job's energy and outcome to the ledger."""
        await self._disk.record(
            self._ledger.record_job,
            key[0],
            key[1],
            self.meter.day,
            wh,
            self._clock(),
            outcome,
            self.meter.today_wh,
        )

    async def close(self, key: Key, outcome: str, next_computing: Key | None = None) -> float:
        """Book and keep the energy of a job that ended without a result."""
        wh = self.book(key, next_computing)
        await self.keep(key, wh, outcome)
        return wh

    async def save_day(self) -> None:
        await self._disk.record(self._ledger.save_day, self.meter.day, self.meter.today_wh)

    async def run(self, job_running: asyncio.Event) -> None:
        """The `energy-save` task: while a job runs, the day's total every SAVE_EVERY_S."""
        while True:
            await job_running.wait()
            await asyncio.sleep(SAVE_EVERY_S)
            await self.save_day()
