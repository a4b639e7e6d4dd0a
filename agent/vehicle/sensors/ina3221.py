"""Jetson power from the INA3221 monitors, in both driver layouts.

Mainline hwmon driver (JetPack 5/6):
    /sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in<N>_label    rail name, e.g. VDD_IN
    .../in<N>_input (mV), .../curr<N>_input (mA)               power = V x I
Older L4T 32.x iio driver:
    /sys/bus/i2c/drivers/ina3221x/*/iio:device*/rail_name_<N>, in_power<N>_input (mW)
The total input rail (VDD_IN / POM_5V_IN) is the board's power when present;
otherwise the rails are summed.
"""

from __future__ import annotations

from pathlib import Path

from agent.vehicle.sensors import SensorError, read_number, read_text, under

_TOTAL = ("VDD_IN", "POM_5V_IN")


class Ina3221Power:
    def __init__(self, root: Path) -> None:
        self.rails: dict[str, tuple[str, list[Path]]] = {}
        for hwmon in sorted(under(root, "/sys/bus/i2c/drivers/ina3221").glob("*/hwmon/hwmon*")):
            for label in sorted(hwmon.glob("in*_label")):
                n = label.name[2:].split("_")[0]
                volt, curr = hwmon / f"in{n}_input", hwmon / f"curr{n}_input"
                if volt.exists() and curr.exists():
                    self.rails[read_text(label)] = ("hwmon", [volt, curr])
        for dev in sorted(under(root, "/sys/bus/i2c/drivers/ina3221x").glob("*/iio:device*")):
            for name in sorted(dev.glob("rail_name_*")):
                n = name.name.rsplit("_", 1)[1]
                power = dev / f"in_power{n}_input"
                if power.exists():
                    self.rails[read_text(name)] = ("iio", [power])
        if not self.rails:
            raise SensorError(
                "no INA3221 rails found (looked for the ina3221 hwmon and ina3221x iio drivers)"
            )

    def _rail_w(self, layout: str, paths: list[Path]) -> float:
        if layout == "hwmon":
            return read_number(paths[0]) / 1000.0 * read_number(paths[1]) / 1000.0
        return read_number(paths[0]) / 1000.0

    def read_w(self, now: float) -> float:
        for total in _TOTAL:
            if total in self.rails:
                return self._rail_w(*self.rails[total])
        return sum(self._rail_w(*rail) for rail in self.rails.values())

    @property
    def source(self) -> str:
        return "ina3221:" + ",".join(sorted(self.rails))
