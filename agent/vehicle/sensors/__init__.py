"""Readers for a rig's real sensors: thermal zones, mains power, RAPL, Jetson INA3221, Pi PMIC.

Each reader takes a `root` (the filesystem root, "/" on a rig, a fake tree in
tests), discovers its files by glob (bus and hwmon numbers vary between boards),
and raises `SensorError` with a message that says what to do when it cannot read.
"""

from __future__ import annotations

from pathlib import Path


class SensorError(Exception):
    """Raised when a sensor is absent, unreadable (permissions) or reports nonsense."""


def read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except PermissionError:
        raise SensorError(
            f"permission denied reading {path}: run the agent with read access to it "
            "(RAPL energy counters are root-only since Linux 5.10; grant access with a udev "
            "rule or systemd's ReadOnlyPaths/SupplementaryGroups)"
        ) from None
    except OSError as exc:
        raise SensorError(f"cannot read {path}: {exc.strerror}") from None


def read_number(path: Path) -> float:
    text = read_text(path)
    try:
        return float(text)
    except ValueError:
        raise SensorError(f"{path} holds {text[:40]!r}, not a number") from None


def under(root: Path, absolute: str) -> Path:
    """`absolute` (a /sys path) inside `root`."""
    return root / absolute.lstrip("/")
