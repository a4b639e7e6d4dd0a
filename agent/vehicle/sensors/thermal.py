"""Temperatures from /sys/class/thermal/thermal_zone*/temp (milli-degrees Celsius)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.vehicle.sensors import SensorError, read_number, read_text, under


@dataclass(frozen=True, slots=True)
class ThermalZone:
    path: Path
    kind: str  # the zone's `type`, e.g. "cpu-thermal", "x86_pkg_temp", "CPU-therm"

    def read_c(self) -> float:
        milli = read_number(self.path / "temp")
        if not -50_000 <= milli <= 200_000:
            raise SensorError(f"{self.path}/temp reads {milli} m°C, outside any real range")
        return milli / 1000.0


def discover_zones(root: Path) -> list[ThermalZone]:
    base = under(root, "/sys/class/thermal")
    zones = []
    for zone in sorted(base.glob("thermal_zone*")):
        if (zone / "temp").exists():
            kind = read_text(zone / "type") if (zone / "type").exists() else zone.name
            zones.append(ThermalZone(zone, kind))
    return zones


class HottestZone:
    """The compute temperature as the hottest readable zone (a conservative choice)."""

    def __init__(self, root: Path) -> None:
        self.zones = discover_zones(root)
        if not self.zones:
            raise SensorError(f"no thermal zones under {under(root, '/sys/class/thermal')}")

    def read_c(self) -> tuple[float, str]:
        readings = []
        for zone in self.zones:
            try:
                readings.append((zone.read_c(), f"sysfs:{zone.path}/temp"))
            except SensorError:
                continue
        if not readings:
            raise SensorError("no thermal zone could be read")
        return max(readings)
