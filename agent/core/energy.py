"""Energy accounting (pure): compute energy per job and per owner's day.

The meter counts the compute module's energy while a job is running: that is the
energy lent, what an owner would be paid for (`energy_wh` in each signed result).

Each sample closes the interval since the previous one and books it to the job the
caller names: the job whose compute ran during that interval, or None. The caller
samples at every job's start and end, so an interval never straddles two jobs and
none is booked to a job already closed or to nobody while a job ran. (Booking each
interval to the job of the interval's first sample lost the tail of every job and
the head of every job after an idle gap: jobs were booked 15 % low at the median.)

The energy of an interval comes from the source's own energy counter where it has
one (the emulator; RAPL on x86 rigs), else from its power readings by the trapezoid
rule. A gap longer than `max_gap_s` (a suspended process, a clock jump) counts only
`max_gap_s` at the later power, never a guess across the gap. Every Wh booked to a
job is booked to the day as well, so a day's jobs sum to the day exactly. Days are
the owner's local dates (the caller passes them), so the daily allowance resets at
the owner's midnight.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

JobKey = tuple[str, int]


@dataclass
class EnergyMeter:
    day: str
    today_wh: float = 0.0
    max_gap_s: float = 5.0
    _last: tuple[float, float, float | None] | None = None  # at, power W, counter J
    _jobs: dict[JobKey, float] = field(default_factory=lambda: defaultdict(float))

    def sample(
        self,
        at: float,
        power_w: float,
        day: str,
        job: JobKey | None,
        energy_j: float | None = None,
    ) -> float:
        """Record the compute module at `at` (its power, and its energy counter where the
        source keeps one) and book the interval since the last sample to `job`, the job that
        ran during it. Returns the Wh booked."""
        if day != self.day:
            self.day, self.today_wh = day, 0.0
        power = max(0.0, power_w)
        last, self._last = self._last, (at, power, energy_j)
        if last is None or at <= last[0] or job is None:
            return 0.0
        dt = at - last[0]
        if energy_j is not None and last[2] is not None and energy_j >= last[2]:
            wh = (energy_j - last[2]) / 3600.0
        elif dt > self.max_gap_s:
            wh = power * self.max_gap_s / 3600.0
        else:
            wh = (last[1] + power) / 2.0 * dt / 3600.0
        self.today_wh += wh
        self._jobs[job] += wh
        return wh

    def job_wh(self, job: JobKey) -> float:
        return self._jobs.get(job, 0.0)

    def close_job(self, job: JobKey) -> float:
        """The job's total, forgotten by the meter (the ledger keeps it)."""
        return self._jobs.pop(job, 0.0)
