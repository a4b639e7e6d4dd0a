"""The car and the gate: the `vehicle-watch` task looks at the car at each poll, at the
scenario's next event and on a kernel uevent; evaluates the gate (agent.core.gate); books
the energy of each interval; and, when the gate closes, stops compute first (the executor's
preemption), before anything is logged or sent.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable

from agent.config import AgentConfig
from agent.core.gate import Gate, GateDecision, GateInputs, GatePolicy
from agent.runtime.energy import JobEnergy
from agent.runtime.power import Power
from agent.runtime.record import Recorder
from agent.vehicle.snapshot import VehicleSignals, VehicleSnapshot
from agent.vehicle.uevents import UeventWatcher


def gate_policy(config: AgentConfig) -> GatePolicy:
    limits = config.limits
    return GatePolicy(
        opted_in=config.owner.opted_in,
        max_compute_temp_c=limits.max_compute_temp_c,
        resume_compute_temp_c=limits.resume_compute_temp_c,
        max_battery_temp_c=limits.max_battery_temp_c,
        resume_battery_temp_c=limits.resume_battery_temp_c,
        min_soc_pct=limits.min_soc_pct,
        resume_soc_pct=limits.resume_soc_pct,
        daily_energy_wh=limits.daily_energy_wh,
        hold_s=limits.gate_hold_s,
    )


class Watch:
    def __init__(
        self,
        config: Callable[[], AgentConfig],
        vehicle: VehicleSignals,
        energy: JobEnergy,
        power: Power,
        recorder: Recorder,
        *,
        trust_valid: Callable[[], bool],
        state_writable: Callable[[], bool],
        computing: Callable[[], bool],
        on_close: Callable[[str], None],
        on_change: Callable[[GateDecision], None],
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self.vehicle = vehicle
        self._energy = energy
        self._power = power
        self._rec = recorder
        self._trust_valid = trust_valid
        self._state_writable = state_writable
        self._computing = computing
        self._on_close = on_close
        self._on_change = on_change
        self._clock = clock
        self.gate = Gate(gate_policy(config()))
        self._hours = config().owner.allowed_hours  # built once; rebuilt on reload
        self.last_snapshot: VehicleSnapshot | None = None
        self._changed = asyncio.Event()  # a pushed change of the car: look now

    def local(self, at: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(at, self._config().owner.zone)

    def next_window(self, now: float) -> dt.datetime | None:
        """When the owner's next allowed window opens, if `now` is outside the hours."""
        return self._hours.next_opening(self.local(now))

    def reconfigure(self, config: AgentConfig) -> None:
        """The owner's rules changed (a reload)."""
        self.gate.update_policy(gate_policy(config))
        self._hours = config.owner.allowed_hours

    def snapshot(self, now: float) -> VehicleSnapshot:
        """A fresh reading of the car, kept as the last one."""
        snap = self.vehicle.snapshot(now)
        self.last_snapshot = snap
        return snap

    def observe(self, now: float) -> GateDecision:
        """One look at the car: account energy, evaluate the gate, react to a change."""
        snap = self.snapshot(now)
        self._energy.sample(now, snap)
        decision = self.gate.evaluate(
            GateInputs(
                snap,
                within_hours=self._hours.allows(self.local(now)),
                energy_today_wh=self._energy.today_wh,
                trust_valid=self._trust_valid(),
                state_writable=self._state_writable(),
            )
        )
        metrics = self._rec.metrics
        metrics.compute_power.set(snap.compute_power_w)
        metrics.compute_temp.set(snap.compute_temp_c)
        metrics.energy_today.set(self._energy.today_wh)
        self._power.sample(snap)
        if decision.changed:
            if not decision.open:  # first: compute stops before anything is logged
                self._on_close(",".join(r.value for r in decision.reasons))
            if snap.faults:
                self._rec.log("error", "sensor_fault", faults=list(snap.faults))
            self._on_change(decision)
        return decision

    def vehicle_changed(self, *_: object) -> None:
        """A kernel uevent for one of the car's signals."""
        self._changed.set()

    async def _wait(self, poll_s: float) -> None:
        """Until the next look at the car: the poll interval, cut short by a pushed change
        (a uevent) or by the instant the scenario's next event changes the car."""
        delay = poll_s
        next_change = getattr(self.vehicle, "next_change_at", lambda: None)()
        if next_change is not None:
            # At least 0.5 ms: a change due now but not yet applied must not spin the loop.
            delay = min(delay, max(0.0005, next_change - self._clock()))
        try:
            async with asyncio.timeout(delay):
                await self._changed.wait()
        except TimeoutError:
            pass
        self._changed.clear()

    def _watch_uevents(self) -> UeventWatcher | None:
        """On a rig, listen to the kernel's uevents for the signals read from sysfs."""
        subsystems: frozenset[str] = getattr(self.vehicle, "uevent_subsystems", frozenset())
        if not subsystems:
            return None
        watcher = UeventWatcher(subsystems, self.vehicle_changed)
        why_not = watcher.start(asyncio.get_running_loop())
        if why_not is not None:
            self._rec.log(
                "warning",
                "uevents_unavailable",
                reason=why_not,
                polling_s=self._config().agent.vehicle_poll_s,
            )
            return None
        self._rec.log("info", "uevents_watched", subsystems=sorted(subsystems))
        return watcher

    async def run(self) -> None:
        """The `vehicle-watch` task."""
        watcher = self._watch_uevents()
        try:
            while True:
                self.observe(self._clock())
                # Fast while computing (a close must stop compute at once); slower while the
                # gate is closed and nothing runs, where a second's delay costs nothing.
                agent = self._config().agent
                busy = self.gate.is_open or self._computing()
                await self._wait(
                    agent.vehicle_poll_s if busy else max(agent.vehicle_poll_s, agent.closed_poll_s)
                )
        finally:
            if watcher is not None:
                watcher.close()
