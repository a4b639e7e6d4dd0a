"""A rig's vehicle: real host sensors where the rig has them, the emulated car for the rest.

A Raspberry Pi or Jetson on a bench has no gearbox or charge port: drive and
charge state come from the emulated car (scenario or live control), while the
compute temperature, mains power and compute power come from the board. A
snapshot's `sources` says which is which. A sensor that fails is a fault: the
snapshot carries it and the gate closes (fail safe), with the reason logged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from agent.vehicle.emulated import EmulatedVehicle
from agent.vehicle.sensors import SensorError
from agent.vehicle.sensors.ina3221 import Ina3221Power
from agent.vehicle.sensors.mains import MainsSupply
from agent.vehicle.sensors.rapl import RaplPower
from agent.vehicle.sensors.thermal import HottestZone
from agent.vehicle.sensors.vcgencmd import PmicPower, run_vcgencmd
from agent.vehicle.snapshot import VehicleSnapshot


class PowerSensor(Protocol):
    @property
    def source(self) -> str: ...

    def read_w(self, now: float) -> float | None: ...


def discover_power(root: Path, choice: str, vcgencmd: str = "vcgencmd") -> PowerSensor | None:
    """The configured power sensor, or the first that exists for "auto"; None for "none"."""
    if choice == "none":
        return None
    makers: dict[str, Callable[[], PowerSensor]] = {
        "rapl": lambda: RaplPower(root),
        "ina3221": lambda: Ina3221Power(root),
        "pmic": lambda: _checked_pmic(vcgencmd),
    }
    if choice != "auto":
        return makers[choice]()
    errors = []
    for name, make in makers.items():
        try:
            return make()
        except SensorError as exc:
            errors.append(f"{name}: {exc}")
    raise SensorError("no power sensor found; " + "; ".join(errors))


def _checked_pmic(binary: str) -> PmicPower:
    sensor = PmicPower(lambda args: run_vcgencmd(args, binary))
    sensor.read_w(time.time())  # fails now, clearly, rather than on every poll
    return sensor


class HostVehicle:
    def __init__(
        self,
        emulated: EmulatedVehicle,
        *,
        thermal: HottestZone | None,
        mains: MainsSupply | None,
        power: PowerSensor | None,
        compute_max_w: float | None = None,
    ) -> None:
        self.compute_max_w = compute_max_w
        self.emulated = emulated
        self.thermal = thermal
        self.mains = mains
        self.power = power
        self._last_power_w = 0.0

    def next_change_at(self) -> float | None:
        """The scenario's next event, for the signals still emulated (gear, charge level)."""
        return self.emulated.next_change_at()

    @property
    def uevent_subsystems(self) -> frozenset[str]:
        """Kernel subsystems whose uevents mean a signal read here may have changed: the
        daemon looks at the car the moment one arrives instead of at its next poll."""
        wanted = set()
        if self.mains is not None:
            wanted.add("power_supply")
        if self.thermal is not None:
            wanted.add("thermal")
        return frozenset(wanted)

    def snapshot(self, now: float) -> VehicleSnapshot:
        snap = self.emulated.snapshot(now)
        sources = dict.fromkeys(("gear", "soc_pct", "battery_temp_c", "ambient_temp_c"), "emulated")
        changes: dict[str, object] = {}
        faults: list[str] = []
        if self.thermal is not None:
            try:
                changes["compute_temp_c"], sources["compute_temp_c"] = self.thermal.read_c()
            except SensorError as exc:
                faults.append(str(exc))
        if self.mains is not None:
            try:
                online, where = self.mains.online()
                changes["plugged_in"] = changes["charging"] = online
                sources["plugged_in"] = sources["charging"] = where
            except SensorError as exc:
                faults.append(str(exc))
        if self.power is not None:
            try:
                watts = self.power.read_w(now)
                if watts is not None:
                    self._last_power_w = watts
                changes["compute_power_w"] = self._last_power_w
                changes["compute_energy_j"] = None  # the emulator's counter is not this sensor's
                sources["compute_power_w"] = self.power.source
            except SensorError as exc:
                faults.append(str(exc))
        changes["compute_max_w"] = self.compute_max_w
        return replace(snap, **changes, sources=sources, faults=tuple(faults))  # type: ignore[arg-type]
