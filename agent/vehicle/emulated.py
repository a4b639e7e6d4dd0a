"""The emulated car: plays a scenario through a small physical model, at real time or faster.

Physics, integrated in steps of at most one scenario-second:
  compute power  P = idle + load * (max - idle), `load` in [0, 1] from the agent
  compute temp   dT/dt = (ambient + heat_soak + c_per_w * P - T) / tau   (first order)
  charge power   full `charger_kw` below `taper_from_pct`, tapering linearly to a 5 % trickle
                 at 100 %; when full, the charger still supplies the car's loads
  state of charge  rises with charge power, falls with driving and compute power
  battery temp   dT/dt = (ambient + c_per_kw * (charge kW + drive kW) - T) / tau
Scenario events (and live `set` calls) change gear, plug, charger and ambient,
or force a temperature or charge level; the physics carries on from there.
The car keeps a compute energy counter (J, on the agent's clock): idle power over
time plus (max - idle) over the seconds of full load the worker really computed
(its CPU time over its threads, `busy_s`), so the counter follows the work to the
CPU time, whatever the windows over which the reported power is averaged. Without
a `busy_s` source it integrates the power model at the load read at each step.
It is the ground truth that energy booking is held to.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.vehicle.scenario import CarModel, Scenario, ScenarioEvent, VehicleState
from agent.vehicle.snapshot import Gear, VehicleSnapshot

_MAX_STEP_S = 1.0
_SOURCES = {"all": "emulated"}


def compute_power_w(car: CarModel, load: float) -> float:
    return car.compute_idle_w + max(0.0, min(1.0, load)) * (car.compute_max_w - car.compute_idle_w)


def charger_kw(car: CarModel, state: VehicleState, load_kw: float) -> float:
    """What the charger delivers now: tapered above `taper_from_pct`; just the loads when full."""
    if not (state.plugged_in and state.charging):
        return 0.0
    if state.soc_pct >= 100.0:
        return load_kw
    if state.soc_pct <= car.taper_from_pct:
        return car.charger_kw
    frac = (100.0 - state.soc_pct) / (100.0 - car.taper_from_pct)
    return max(load_kw, car.charger_kw * max(frac, 0.05))  # a trickle finishes the charge


def step(car: CarModel, state: VehicleState, dt_s: float, load: float) -> VehicleState:
    """Advance the physics by `dt_s` scenario-seconds (pure)."""
    p_compute = compute_power_w(car, load)
    driving = state.gear in (Gear.DRIVE, Gear.REVERSE)
    drive_kw = car.drive_kw if driving else 0.0
    load_kw = p_compute / 1000.0 + drive_kw
    charge_kw = charger_kw(car, state, load_kw)
    soc = state.soc_pct + (charge_kw - load_kw) * dt_s / 3600.0 / car.battery_kwh * 100.0
    soc = min(100.0, max(0.0, soc))
    target_c = state.ambient_temp_c + state.heat_soak_c + car.compute_c_per_w * p_compute
    compute_t = state.compute_temp_c + (target_c - state.compute_temp_c) * min(
        1.0, dt_s / car.compute_tau_s
    )
    target_b = state.ambient_temp_c + car.battery_c_per_kw * (charge_kw + drive_kw)
    battery_t = state.battery_temp_c + (target_b - state.battery_temp_c) * min(
        1.0, dt_s / car.battery_tau_s
    )
    return state.model_copy(
        update={"soc_pct": soc, "compute_temp_c": compute_t, "battery_temp_c": battery_t}
    )


class EmulatedVehicle:
    """Snapshots of an emulated car following `scenario`; `now` is the agent's clock."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        started_at: float,
        time_scale: float = 1.0,
        load: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.scenario = scenario
        self.car = scenario.car
        self.time_scale = time_scale
        self._started_at = started_at
        self._state = scenario.initial
        self._t = 0.0  # scenario seconds simulated so far
        self._next_event = 0
        self._load = load
        self._last_load = 0.0
        self.compute_energy_j = 0.0
        self._energy_at = started_at
        self._busy: Callable[[], float] | None = None
        self._busy_last: float | None = None

    def attach_load(
        self, load: Callable[[], float], busy_s: Callable[[], float] | None = None
    ) -> None:
        """Where the compute load (0..1) comes from: the agent's worker; and, for the energy
        counter, its cumulative seconds of full load (monotonic)."""
        self._load = load
        self._last_load = 0.0
        self._busy = busy_s
        self._busy_last = None if busy_s is None else busy_s()

    def _advance(self, now: float, load: float) -> None:
        if now > self._energy_at:
            dt = now - self._energy_at
            if self._busy is not None:
                busy = self._busy()
                # Not capped at dt: a running thread's CPU counter lags up to a scheduler tick
                # and catches up later; capping would drop the catch-up. The counter is exact
                # whenever the worker is blocked, as at every job's start and end.
                done = max(0.0, busy - (self._busy_last if self._busy_last is not None else busy))
                self._busy_last = busy
                car = self.car
                self.compute_energy_j += car.compute_idle_w * dt + done * (
                    car.compute_max_w - car.compute_idle_w
                )
            else:
                self.compute_energy_j += compute_power_w(self.car, load) * dt
            self._energy_at = now
        target = max(self._t, (now - self._started_at) * self.time_scale)
        events = self.scenario.events
        while self._t < target or (
            self._next_event < len(events) and events[self._next_event].at_s <= self._t
        ):
            if self._next_event < len(events) and events[self._next_event].at_s <= self._t:
                self._state = events[self._next_event].apply(self._state)
                self._next_event += 1
                continue
            horizon = target
            if self._next_event < len(events):
                horizon = min(horizon, events[self._next_event].at_s)
            dt = min(_MAX_STEP_S, horizon - self._t)
            self._state = step(self.car, self._state, dt, load)
            self._t += dt

    @property
    def started_at(self) -> float:
        """When (agent clock) the scenario's time 0 was."""
        return self._started_at

    def next_change_at(self) -> float | None:
        """When (agent clock) the scenario's next event changes the car, if it has one more:
        the daemon wakes at that instant instead of finding the change at its next poll."""
        events = self.scenario.events
        if self._next_event >= len(events):
            return None
        return self._started_at + events[self._next_event].at_s / self.time_scale

    def state(self, now: float) -> VehicleState:
        self._advance(now, self._last_load)
        return self._state

    def snapshot(self, now: float) -> VehicleSnapshot:
        # The load is read once per snapshot: it may be a measurement over the last interval.
        self._last_load = self._load()
        s = self.state(now)
        p_compute = compute_power_w(self.car, self._last_load)
        driving = s.gear in (Gear.DRIVE, Gear.REVERSE)
        load_kw = p_compute / 1000.0 + (self.car.drive_kw if driving else 0.0)
        return VehicleSnapshot(
            at=now,
            gear=s.gear,
            plugged_in=s.plugged_in,
            charging=s.charging and s.plugged_in,
            compute_temp_c=s.compute_temp_c,
            charge_power_w=charger_kw(self.car, s, load_kw) * 1000.0,
            soc_pct=s.soc_pct,
            battery_temp_c=s.battery_temp_c,
            ambient_temp_c=s.ambient_temp_c,
            compute_power_w=p_compute,
            compute_max_w=self.car.compute_max_w,
            compute_energy_j=self.compute_energy_j,
            sources=_SOURCES,
        )

    def set(self, now: float, **fields: object) -> VehicleState:
        """Change the car now, as a scenario event would (live control). ValueError if impossible."""
        self._advance(now, self._last_load)
        event = ScenarioEvent.model_validate({"at_s": 0.0, **fields})
        self._state = event.apply(self._state)
        return self._state
