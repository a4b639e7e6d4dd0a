"""Raspberry Pi: `vcgencmd get_throttled` flags and the Pi 5 PMIC's rails (`pmic_read_adc`)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from agent.vehicle.sensors import SensorError

_THROTTLED = re.compile(r"^throttled=(0x[0-9a-fA-F]+)$")
_ADC = re.compile(r"^\s*(\S+)_(A|V)\s+(?:current|volt)\(\d+\)=([0-9.]+)(A|V)\s*$")


@dataclass(frozen=True, slots=True)
class Throttled:
    bits: int

    @property
    def under_voltage(self) -> bool:
        return bool(self.bits & 0x1)

    @property
    def freq_capped(self) -> bool:
        return bool(self.bits & 0x2)

    @property
    def throttled(self) -> bool:
        return bool(self.bits & 0x4)

    @property
    def soft_temp_limit(self) -> bool:
        return bool(self.bits & 0x8)


def parse_throttled(text: str) -> Throttled:
    m = _THROTTLED.match(text.strip())
    if not m:
        raise SensorError(f"unexpected `vcgencmd get_throttled` output: {text.strip()[:60]!r}")
    return Throttled(int(m.group(1), 16))


def parse_pmic_adc(text: str) -> dict[str, float]:
    """Watts per rail from `vcgencmd pmic_read_adc`: rails with both a _A and a _V line."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _ADC.match(line)
        if m:
            rail, kind, value = m.group(1), m.group(2), float(m.group(3))
            (amps if kind == "A" else volts)[rail] = value
    rails = {rail: amps[rail] * volts[rail] for rail in amps.keys() & volts.keys()}
    if not rails:
        raise SensorError("`vcgencmd pmic_read_adc` gave no rail with both current and voltage")
    return rails


Runner = Callable[[list[str]], str]


def run_vcgencmd(args: list[str], binary: str = "vcgencmd") -> str:
    try:
        done = subprocess.run(
            [binary, *args], capture_output=True, text=True, timeout=2, check=False
        )
    except FileNotFoundError:
        raise SensorError(
            f"{binary} not found: install it (raspi-utils) or choose another power sensor"
        ) from None
    except subprocess.TimeoutExpired:
        raise SensorError(f"{binary} {' '.join(args)} did not answer in 2 s") from None
    if done.returncode != 0:
        raise SensorError(f"{binary} {' '.join(args)} failed: {done.stderr.strip()[:200]}")
    return done.stdout


class PmicPower:
    def __init__(self, runner: Runner) -> None:
        self._run = runner

    def read_w(self, now: float) -> float:
        return sum(parse_pmic_adc(self._run(["pmic_read_adc"])).values())

    def throttled(self) -> Throttled:
        return parse_throttled(self._run(["get_throttled"]))

    @property
    def source(self) -> str:
        return "vcgencmd:pmic_read_adc"
