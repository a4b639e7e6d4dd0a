"""Energy accounting (pure): compute power integrated over time, per job and per owner's day.

The meter counts the compute module's power while a job is running: that is the
energy lent, what an owner would be paid for. Samples are integrated with the
trapezoid rule; a gap longer than `max_gap_s` (a suspended process, a clock
jump) counts only `max_gap_s` at the later power, never a guess across the gap.
Days are the owner's local dates (the caller passes them), so the daily
allowance resets at the owner's midnight.
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
    _last: tuple[float, float, JobKey | None] | None = None
    _jobs: dict[JobKey, float] = field(default_factory=lambda: defaultdict(float))

    def sample(self, at: float, power_w: float, day: str, job: JobKey | None) -> float:
        """Record power at time `at`; returns the Wh added by this sample."""
        if day != self.day:
            self.day, self.today_wh = day, 0.0
        last, self._last = self._last, (at, max(0.0, power_w), job)
        if last is None or at <= last[0]:
            return 0.0
        dt = at - last[0]
        # Energy of the interval belongs to the job that was running during it.
        running = last[2]
        if running is None:
            return 0.0
        if dt > self.max_gap_s:
            wh = max(0.0, power_w) * self.max_gap_s / 3600.0
        else:
            wh = (last[1] + max(0.0, power_w)) / 2.0 * dt / 3600.0
        self.today_wh += wh
        self._jobs[running] += wh
        return wh

    def job_wh(self, job: JobKey) -> float:
        return self._jobs.get(job, 0.0)

    def close_job(self, job: JobKey) -> float:
        """The job's total, forgotten by the meter (the ledger keeps it)."""
        return self._jobs.pop(job, 0.0)
