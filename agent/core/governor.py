"""The power governor's control law (pure): keep average compute power at or under the cap.

The actuator is the worker's duty cycle d in [0, 1]: in every slot the worker
runs for d of the slot and is paused (SIGSTOP) for the rest. The plant, seen
from here, is P(d) = P_idle + d * span, with span = P_full - P_idle unknown
and changing with the load. Each update:
  1. learns span from the last period (P_avg - P_idle) / d, smoothed, when d is
     large enough for the estimate to mean something;
  2. sets d to the feedforward value (cap - P_idle) / span, plus an integral
     term that removes the estimate's remaining bias;
  3. keeps a small safety margin below the cap, since exceeding it is what the
     owner notices.
A cap change jumps straight to the new feedforward value, so the new cap is
met within one control period instead of after a slow ramp.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PowerGovernor:
    cap_w: float
    idle_w: float
    span_w: float = 20.0  # first guess of P_full - P_idle; learned from measurements
    margin: float = 0.02  # aim this fraction under the cap
    ki: float = 0.3  # integral gain, in duty per (fraction of span) of error
    smoothing: float = 0.5  # weight of a new span estimate
    duty: float = 1.0
    _integral: float = 0.0

    def _target_w(self) -> float:
        return self.cap_w * (1.0 - self.margin)

    def _feedforward(self) -> float:
        if self.span_w <= 0:
            return 1.0
        return (self._target_w() - self.idle_w) / self.span_w

    def set_cap(self, cap_w: float) -> float:
        """A new cap: jump to its feedforward duty and forget the old integral."""
        self.cap_w = cap_w
        self._integral = 0.0
        self.duty = _clamp(self._feedforward())
        return self.duty

    def update(self, avg_power_w: float, applied_duty: float) -> float:
        """The average power over the last period, run at `applied_duty`; returns the next duty."""
        if applied_duty >= 0.1:
            estimate = (avg_power_w - self.idle_w) / applied_duty
            if estimate > 0:
                self.span_w += self.smoothing * (estimate - self.span_w)
        error = (self._target_w() - avg_power_w) / max(self.span_w, 1e-6)
        self._integral = max(-0.5, min(0.5, self._integral + self.ki * error))
        self.duty = _clamp(self._feedforward() + self._integral)
        return self.duty


def _clamp(d: float) -> float:
    return max(0.0, min(1.0, d))
