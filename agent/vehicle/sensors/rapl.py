"""Package power from Intel/AMD RAPL: /sys/class/powercap/intel-rapl:N/energy_uj.

energy_uj is a cumulative counter in microjoules that wraps at
max_energy_range_uj; power is the difference between two reads over the time
between them, with the wrap undone. Root-only since Linux 5.10.
"""

from __future__ import annotations

from pathlib import Path

from agent.vehicle.sensors import SensorError, read_number, read_text, under


def energy_delta_uj(before: float, after: float, max_range_uj: float) -> float:
    """Energy between two counter reads, undoing at most one wrap (pure)."""
    if after >= before:
        return after - before
    return after + (max_range_uj - before)


class RaplPower:
    def __init__(self, root: Path) -> None:
        base = under(root, "/sys/class/powercap")
        # Top-level packages only (intel-rapl:0, intel-rapl:1), not subzones (intel-rapl:0:0).
        self.zones = [
            z
            for z in sorted(base.glob("intel-rapl:*"))
            if z.name.count(":") == 1 and (z / "energy_uj").exists()
        ]
        if not self.zones:
            raise SensorError(f"no RAPL package zones under {base}")
        self.names = [
            read_text(z / "name") if (z / "name").exists() else z.name for z in self.zones
        ]
        self.ranges = [read_number(z / "max_energy_range_uj") for z in self.zones]
        self._last: tuple[float, list[float]] | None = None

    def read_w(self, now: float) -> float | None:
        """Average power since the previous call; None on the first call."""
        counters = [read_number(z / "energy_uj") for z in self.zones]
        last, self._last = self._last, (now, counters)
        if last is None or now <= last[0]:
            return None
        joules = (
            sum(
                energy_delta_uj(b, a, r)
                for b, a, r in zip(last[1], counters, self.ranges, strict=True)
            )
            / 1e6
        )
        return joules / (now - last[0])

    @property
    def source(self) -> str:
        return f"rapl:{','.join(self.names)}"
