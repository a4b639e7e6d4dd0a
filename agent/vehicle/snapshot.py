"""What the rest of the agent reads about the car: one immutable snapshot at a time.

Implementations of `VehicleSignals` (the emulated car, a rig's sensors) live
beside this module; the gate and the daemon only ever see snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class Gear(StrEnum):
    PARK = "P"
    REVERSE = "R"
    NEUTRAL = "N"
    DRIVE = "D"


@dataclass(frozen=True, slots=True)
class VehicleSnapshot:
    """The car's state at time `at` (seconds, the agent's clock)."""

    at: float
    gear: Gear
    plugged_in: bool
    charging: bool
    compute_temp_c: float
    charge_power_w: float = 0.0
    soc_pct: float = 50.0
    battery_temp_c: float = 25.0
    ambient_temp_c: float = 20.0
    compute_power_w: float = 0.0
    # The module's nominal full power, where known (the emulator's model, a rig's config):
    # the power governor's first estimate before it has measured anything.
    compute_max_w: float | None = None
    # The compute module's energy counter in J, where the source keeps one (the emulator,
    # RAPL): energy between two snapshots is then exact, not estimated from two readings.
    compute_energy_j: float | None = None
    # Where each value came from ("emulated", "sysfs:/sys/class/...", ...).
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    # Sensors that could not be read: any fault closes the gate (fail safe).
    faults: tuple[str, ...] = ()


class VehicleSignals(Protocol):
    """Anything that can say what state the car is in now."""

    def snapshot(self, now: float) -> VehicleSnapshot: ...
