"""The power cap: the governor's loop and the duty cycle it sets, and the worker's measured
load that the emulated car turns into compute power.

Tasks:
  power-governor  every control period, sets the duty cycle from the average compute power
                  measured while a job ran (agent.core.governor decides);
  duty-cycle      runs the worker for `duty` of every slot and pauses it (SIGSTOP) for
                  the rest, while the worker has anything to compute.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from agent.core.governor import PowerGovernor
from agent.inference.engine import WorkerEngine
from agent.runtime.record import Recorder
from agent.vehicle.snapshot import VehicleSnapshot

LOAD_WINDOW_S = 0.1

Key = tuple[str, int]


class Power:
    def __init__(
        self,
        engine: WorkerEngine,
        recorder: Recorder,
        *,
        cap_w: Callable[[], float],
        period_s: float,
        slot_s: float,
        running: Callable[[], Key | None],
        job_running: asyncio.Event,
    ) -> None:
        self._engine = engine
        self._rec = recorder
        self._cap_w = cap_w
        self._period_s = period_s
        self._slot_s = slot_s
        self._running = running
        self._job_running = job_running
        self.governor = PowerGovernor(cap_w=cap_w(), idle_w=0.0)
        self._samples: list[float] = []
        self._idle_power_w: float | None = None
        self._load_mark: tuple[float, float] | None = None
        self._load = 0.0
        self._window_closes = False  # the next load reading ends its window, however short
        self._busy_s = 0.0
        self._busy_mark: tuple[int | None, float] | None = None

    # ---- what the car reports ---------------------------------------------

    def sample(self, snap: VehicleSnapshot) -> None:
        """One reading of the car: a sample for the governor while a job runs, else the idle
        power it learns (only while no worker is up)."""
        if self._running() is not None:
            self._samples.append(snap.compute_power_w)
        elif self._engine.pid is None:
            idle = self._idle_power_w
            self._idle_power_w = (
                snap.compute_power_w if idle is None else idle + 0.1 * (snap.compute_power_w - idle)
            )
            self.governor.idle_w = self._idle_power_w
            if snap.compute_max_w is not None:
                self.governor.assume_full_power(snap.compute_max_w)

    def close_window(self) -> None:
        """The next load reading ends its window (a job's energy boundary)."""
        self._window_closes = True

    def compute_load(self) -> float:
        """The worker's measured CPU use as a fraction of its threads, over contiguous windows
        of at least LOAD_WINDOW_S (one duty-cycle slot).

        This drives the emulated car's compute power, so on the emulator the power governor
        closes its loop over real CPU time, not over its own commands. Windows tile time
        without overlap, so averaging the readings gives the true average, like a real
        energy counter.
        """
        cpu = self._engine.cpu_seconds()
        now = time.monotonic()
        if cpu is None:
            self._load_mark = None
            self._load = 0.0
            return 0.0
        if self._load_mark is None:
            self._load_mark = (now, cpu)
            return self._load
        t0, c0 = self._load_mark
        if now - t0 >= LOAD_WINDOW_S or (self._window_closes and now > t0):
            self._window_closes = False
            self._load = max(0.0, min(1.0, (cpu - c0) / (now - t0) / self._engine.threads))
            self._load_mark = (now, cpu)
        return self._load

    def compute_busy_s(self) -> float:
        """Seconds of full compute load so far: the worker's CPU time over its threads, summed
        across worker restarts (monotonic). The emulated car's energy counter follows it."""
        cpu, pid = self._engine.cpu_seconds(), self._engine.pid
        last, self._busy_mark = self._busy_mark, (pid, cpu) if cpu is not None else None
        if cpu is None:
            return self._busy_s
        grown = cpu - last[1] if last is not None and last[0] == pid else cpu  # a new worker
        self._busy_s += max(0.0, grown) / self._engine.threads
        return self._busy_s

    # ---- tasks --------------------------------------------------------------

    async def govern(self) -> None:
        """The `power-governor` task."""
        governed: Key | None = None
        while True:
            await self._job_running.wait()  # nothing to govern while no job runs
            await asyncio.sleep(self._period_s)
            if self.governor.cap_w != self._cap_w():
                self.governor.set_cap(self._cap_w())
            samples, self._samples = self._samples, []
            running = self._running()
            fresh, governed = running != governed, running
            # The first period of a job includes the worker starting: not the plant to learn.
            if running is None or not samples or fresh:
                continue
            applied = self.governor.duty
            duty = self.governor.update(sum(samples) / len(samples), applied)
            self._rec.metrics.duty.set(duty)
            if abs(duty - applied) > 0.05:
                self._rec.log("debug", "duty_changed", duty=round(duty, 3), cap_w=self._cap_w())

    async def duty_cycle(self) -> None:
        """The `duty-cycle` task."""
        slot = self._slot_s
        engine = self._engine
        while True:
            # Governed while the worker has anything to compute: the running job, or the next
            # one staged behind it (it starts in the worker before the executor picks it up).
            if not engine.has_work:
                engine.resume()
                await self._job_running.wait()
            duty = self.governor.duty
            if duty >= 0.999:
                engine.resume()
                await asyncio.sleep(slot)
            elif duty <= 0.001:
                engine.pause()
                await asyncio.sleep(slot)
            else:
                engine.resume()
                await asyncio.sleep(duty * slot)
                if engine.has_work:
                    engine.pause()
                await asyncio.sleep((1.0 - duty) * slot)
