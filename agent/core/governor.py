"""The power governor's control law (pure): keep average compute power at or under the cap.

The actuator is the worker's duty cycle d in [0, 1]: in every slot the worker
runs for d of the slot and is paused (SIGSTOP) for the rest. The plant, seen
from here, is P(d) = P_idle + d * span, with span = P_full - P_idle unknown
and changing with the load. Each update:
  1. learns span from the last period, (P_avg - P_idle) / d: the first
     estimate is taken as is, and so is one when two periods in a row show
     the load clearly changed (by over 20-25 %); others are smoothed (a lone
     outlier is ignored), since a single
     period's measurement is noisy (10 ms CPU-time ticks on the emulator,
     ADC noise on rigs);
  2. sets d to the feedforward value (target - P_idle) / span, plus a small,
     bounded integral term that removes what bias remains;
  3. aims `margin` under the cap, since exceeding it is what the owner notices.
Until the first estimate the duty is the feedforward of a nominal full power
where one is known (`assume_full_power`), else a conservative `start_duty`. A cap change
jumps straight to the new feedforward value: the new cap is met within one
control period instead of after a slow ramp.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PowerGovernor:
    cap_w: float
    idle_w: float
    span_w: float | None = None  # P_full - P_idle, learned
    margin: float = 0.03
    ki: float = 0.08
    smoothing: float = 0.15
    start_duty: float = 0.25
    duty: float = 0.25
    _integral: float = 0.0
    _last_jump: int = 0
    _assumed: bool = False

    def __post_init__(self) -> None:
        self.duty = self._clamped_feedforward()

    def _target_w(self) -> float:
        return self.cap_w * (1.0 - self.margin)

    def _clamped_feedforward(self) -> float:
        if self.span_w is None:
            return self.start_duty
        if self.span_w <= 1e-6:
            return 1.0
        return _clamp((self._target_w() - self.idle_w) / self.span_w)

    def set_cap(self, cap_w: float) -> float:
        """A new cap: jump to its feedforward duty and forget the old integral."""
        self.cap_w = cap_w
        self._integral = 0.0
        self.duty = self._clamped_feedforward()
        return self.duty

    def assume_full_power(self, full_w: float) -> float:
        """A nominal full power to start from, until the first measurement says otherwise."""
        if self.span_w is None and full_w > self.idle_w:
            self.span_w = full_w - self.idle_w
            self._assumed = True
            self.duty = self._clamped_feedforward()
        return self.duty

    def update(self, avg_power_w: float, applied_duty: float) -> float:
        """The average power over the last period, run at `applied_duty`; returns the next duty."""
        if applied_duty >= 0.1:
            estimate = max(0.0, (avg_power_w - self.idle_w) / applied_duty)
            jump = 0
            if self.span_w is not None:
                jump = (estimate > 1.25 * self.span_w) - (estimate < 0.8 * self.span_w)
            if self.span_w is None or self._assumed or (jump != 0 and jump == self._last_jump):
                self._assumed = False
                # First look, or two periods in a row say the load changed: believe it
                # now rather than spend seconds over the cap (or far under it).
                self.span_w = estimate
                jump = 0
            elif jump == 0:
                self.span_w += self.smoothing * (estimate - self.span_w)
            self._last_jump = jump
        if self.span_w is None:
            return self.duty
        error = (self._target_w() - avg_power_w) / max(self.span_w, 1e-6)
        self._integral = max(-0.2, min(0.2, self._integral + self.ki * error))
        self.duty = _clamp(self._clamped_feedforward() + self._integral)
        return self.duty


def _clamp(d: float) -> float:
    return max(0.0, min(1.0, d))
