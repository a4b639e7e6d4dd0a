"""The gate: may the car lend its computer now? A pure state machine over snapshots.

Rules (each closed rule adds its reason):
  - the owner opted in                                   (instant)
  - parked, plugged in, charging                         (instant: safety)
  - compute module below `max_compute_temp_c`; once over, it stays closed
    until the temperature falls below `max - resume_margin_c` (hysteresis)
After any close, the gate holds closed for `hold_s` before it may reopen, so a
value hovering at a limit cannot make it flap. Closing is never delayed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from agent.vehicle.snapshot import Gear, VehicleSnapshot


class GateReason(StrEnum):
    NOT_OPTED_IN = "not_opted_in"
    NOT_PARKED = "not_parked"
    UNPLUGGED = "unplugged"
    NOT_CHARGING = "not_charging"
    COMPUTE_TOO_HOT = "compute_too_hot"
    HOLDING = "holding_after_close"


@dataclass(frozen=True, slots=True)
class GatePolicy:
    opted_in: bool
    max_compute_temp_c: float
    resume_margin_c: float = 5.0
    hold_s: float = 30.0


@dataclass(frozen=True, slots=True)
class GateDecision:
    open: bool
    reasons: tuple[GateReason, ...]
    changed: bool
    at: float


@dataclass(slots=True)
class Gate:
    """Turns successive snapshots into open/closed decisions with reasons."""

    policy: GatePolicy
    _open: bool = False
    _hot: bool = False
    _closed_at: float | None = None
    _last: GateDecision | None = field(default=None)

    def evaluate(self, snap: VehicleSnapshot) -> GateDecision:
        p = self.policy
        reasons: list[GateReason] = []
        if not p.opted_in:
            reasons.append(GateReason.NOT_OPTED_IN)
        if snap.gear is not Gear.PARK:
            reasons.append(GateReason.NOT_PARKED)
        if not snap.plugged_in:
            reasons.append(GateReason.UNPLUGGED)
        if not snap.charging:
            reasons.append(GateReason.NOT_CHARGING)
        if snap.compute_temp_c >= p.max_compute_temp_c:
            self._hot = True
        elif snap.compute_temp_c < p.max_compute_temp_c - p.resume_margin_c:
            self._hot = False
        if self._hot:
            reasons.append(GateReason.COMPUTE_TOO_HOT)

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

        decision = GateDecision(
            open=now_open, reasons=tuple(reasons), changed=now_open != self._open, at=snap.at
        )
        self._open = now_open
        self._last = decision
        return decision

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def last(self) -> GateDecision | None:
        return self._last
