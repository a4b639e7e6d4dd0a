"""Mains power from /sys/class/power_supply/*/online where `type` is Mains."""

from __future__ import annotations

from pathlib import Path

from agent.vehicle.sensors import SensorError, read_text, under


class MainsSupply:
    def __init__(self, root: Path) -> None:
        base = under(root, "/sys/class/power_supply")
        self.supplies = [
            d
            for d in sorted(base.glob("*"))
            if (d / "type").exists()
            and read_text(d / "type") == "Mains"
            and (d / "online").exists()
        ]
        if not self.supplies:
            raise SensorError(f"no Mains power supply under {base}")

    def online(self) -> tuple[bool, str]:
        for supply in self.supplies:
            if read_text(supply / "online") == "1":
                return True, f"sysfs:{supply}/online"
        return False, f"sysfs:{self.supplies[0]}/online"
