"""The gate: may the car lend its computer now? A pure state machine, no I/O, no clock of its own.

Rules; each one that fails adds its reason, and any reason closes the gate at once:
  - the owner opted in, and now is inside the owner's allowed hours
  - parked, plugged in, charging (the charger supplying the car)
  - state of charge above `min_soc_pct`        (reopens only above `resume_soc_pct`)
  - battery below `max_battery_temp_c`         (reopens only below `resume_battery_temp_c`)
  - compute module below `max_compute_temp_c`  (reopens only below `resume_compute_temp_c`)
  - today's energy below the owner's daily allowance
  - every sensor readable (a fault closes the gate: fail safe)
  - the fleet's trust policy unexpired (an expired one admits no job: fail closed)
  - the state disk writable (a job that cannot be recorded cannot be run or its result kept)
The thresholds latch (hysteresis), and after any close the gate holds closed
for `hold_s` before it may reopen, so a value hovering at a limit cannot make
it flap. Closing is never delayed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from agent.vehicle.snapshot import Gear, VehicleSnapshot


class GateReason(StrEnum):
    NOT_OPTED_IN = "not_opted_in"
    OUTSIDE_HOURS = "outside_allowed_hours"
    NOT_PARKED = "not_parked"
    UNPLUGGED = "unplugged"
    NOT_CHARGING = "not_charging"
    BATTERY_LOW = "battery_low"
    BATTERY_TOO_HOT = "battery_too_hot"
    COMPUTE_TOO_HOT = "compute_too_hot"
    ENERGY_SPENT = "daily_energy_spent"
    SENSOR_FAULT = "sensor_fault"
    TRUST_EXPIRED = "trust_policy_expired"
    STATE_DISK = "state_disk_unavailable"
    HOLDING = "holding_after_close"


@dataclass(frozen=True, slots=True)
class GatePolicy:
    opted_in: bool
    max_compute_temp_c: float = 80.0
    resume_compute_temp_c: float = 75.0
    max_battery_temp_c: float = 45.0
    resume_battery_temp_c: float = 40.0
    min_soc_pct: float = 20.0
    resume_soc_pct: float = 25.0
    daily_energy_wh: float = float("inf")
    hold_s: float = 30.0


@dataclass(frozen=True, slots=True)
class GateInputs:
    """Everything the gate looks at, gathered by the caller at one instant."""

    snapshot: VehicleSnapshot
    within_hours: bool = True
    energy_today_wh: float = 0.0
    trust_valid: bool = True
    state_writable: bool = True


@dataclass(frozen=True, slots=True)
class GateDecision:
    open: bool
    reasons: tuple[GateReason, ...]
    changed: bool
    at: float


@dataclass(slots=True)
class Gate:
    """Turns successive inputs into open/closed decisions with reasons."""

    policy: GatePolicy
    _open: bool = False
    _compute_hot: bool = False
    _battery_hot: bool = False
    _battery_low: bool = False
    _closed_at: float | None = None
    _last: GateDecision | None = None

    def evaluate(self, inputs: GateInputs | VehicleSnapshot) -> GateDecision:
        if isinstance(inputs, VehicleSnapshot):
            inputs = GateInputs(inputs)
        snap, p = inputs.snapshot, self.policy
        self._compute_hot = _latch(
            self._compute_hot,
            snap.compute_temp_c >= p.max_compute_temp_c,
            snap.compute_temp_c < p.resume_compute_temp_c,
        )
        self._battery_hot = _latch(
            self._battery_hot,
            snap.battery_temp_c >= p.max_battery_temp_c,
            snap.battery_temp_c < p.resume_battery_temp_c,
        )
        self._battery_low = _latch(
            self._battery_low, snap.soc_pct <= p.min_soc_pct, snap.soc_pct > p.resume_soc_pct
        )
        rules = (
            (not p.opted_in, GateReason.NOT_OPTED_IN),
            (not inputs.within_hours, GateReason.OUTSIDE_HOURS),
            (snap.gear is not Gear.PARK, GateReason.NOT_PARKED),
            (not snap.plugged_in, GateReason.UNPLUGGED),
            (not snap.charging, GateReason.NOT_CHARGING),
            (self._battery_low, GateReason.BATTERY_LOW),
            (self._battery_hot, GateReason.BATTERY_TOO_HOT),
            (self._compute_hot, GateReason.COMPUTE_TOO_HOT),
            (inputs.energy_today_wh >= p.daily_energy_wh, GateReason.ENERGY_SPENT),
            (bool(snap.faults), GateReason.SENSOR_FAULT),
            (not inputs.trust_valid, GateReason.TRUST_EXPIRED),
            (not inputs.state_writable, GateReason.STATE_DISK),
        )
        reasons = [reason for failed, reason in rules if failed]

        if reasons:
            if self._open or self._closed_at is None:
                self._closed_at = snap.at
            now_open = False
        elif (
            not self._open and self._closed_at is not None and snap.at - self._closed_at < p.hold_s
        ):
            reasons.append(GateReason.HOLDING)
            now_open = False
        else:
            now_open = True

        # The first decision is a change from not knowing: a gate that starts closed is
        # reported (logged, in the metrics) like one that closes later.
        changed = self._last is None or now_open != self._open
        decision = GateDecision(open=now_open, reasons=tuple(reasons), changed=changed, at=snap.at)
        self._open = now_open
        self._last = decision
        return decision

    def update_policy(self, policy: GatePolicy) -> None:
        """A reloaded config takes effect at the next evaluation; latches and hold carry over."""
        self.policy = replace(policy)

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def last(self) -> GateDecision | None:
        return self._last


def _latch(latched: bool, trip: bool, clear: bool) -> bool:
    """Hysteresis: set when `trip`, cleared only when `clear`, else unchanged."""
    if trip:
        return True
    if clear:
        return False
    return latched
