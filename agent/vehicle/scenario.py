"""Scenario files: a day (or a test's few seconds) of a car's life as timed events.

    description = "parked at work, charging"
    [car]                 # physical parameters, all optional (see CarModel)
    battery_kwh = 60.0
    [initial]
    gear = "P"            # P, R, N or D
    plugged_in = true
    charging = true       # the charger is enabled (it supplies the car while plugged in)
    soc_pct = 55.0
    compute_temp_c = 35.0
    battery_temp_c = 22.0
    ambient_temp_c = 20.0

    [[events]]
    at_s = 12.5           # seconds after the start, in scenario time
    gear = "D"
    plugged_in = false

Each event sets only the fields it names; temperatures and state of charge in
an event force the physical state to that value, after which the physics
carries on. docs/scenarios.md has the format.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.vehicle.snapshot import Gear
from agent.wire.codec import REGEX_ENGINE


class ScenarioError(Exception):
    """Raised when a scenario file cannot be read or describes an impossible day."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", regex_engine=REGEX_ENGINE)


class CarModel(_Strict):
    """Physical parameters of the emulated car (first-order models, see emulated.py)."""

    battery_kwh: float = Field(default=60.0, gt=0, le=300)
    charger_kw: float = Field(default=7.4, gt=0, le=350)
    taper_from_pct: float = Field(default=80.0, gt=0, lt=100)
    drive_kw: float = Field(default=12.0, ge=0, le=300)
    compute_idle_w: float = Field(default=4.0, ge=0, le=500)
    compute_max_w: float = Field(default=30.0, gt=0, le=2000)
    compute_c_per_w: float = Field(default=1.2, ge=0, le=20)
    compute_tau_s: float = Field(default=90.0, gt=0, le=86_400)
    battery_c_per_kw: float = Field(default=1.5, ge=0, le=50)
    battery_tau_s: float = Field(default=1800.0, gt=0, le=864_000)

    @model_validator(mode="after")
    def _idle_below_max(self) -> CarModel:
        if self.compute_idle_w >= self.compute_max_w:
            raise ValueError("compute_idle_w must be below compute_max_w")
        return self


class VehicleState(_Strict):
    gear: Gear = Gear.PARK
    plugged_in: bool = True
    charging: bool = True
    soc_pct: float = Field(default=60.0, ge=0, le=100)
    compute_temp_c: float = Field(default=35.0, ge=-40, le=150)
    battery_temp_c: float = Field(default=22.0, ge=-40, le=90)
    ambient_temp_c: float = Field(default=20.0, ge=-50, le=60)
    # Extra warming of the compute module above ambient from sun and cabin (a car parked in
    # the sun on a hot afternoon soaks far above the air temperature).
    heat_soak_c: float = Field(default=0.0, ge=0, le=80)

    @model_validator(mode="after")
    def _charging_needs_plug(self) -> VehicleState:
        if self.charging and not self.plugged_in:
            raise ValueError("charging = true while plugged_in = false")
        return self


class ScenarioEvent(_Strict):
    at_s: float = Field(default=0.0, ge=0)
    gear: Gear | None = None
    plugged_in: bool | None = None
    charging: bool | None = None
    soc_pct: float | None = Field(default=None, ge=0, le=100)
    compute_temp_c: float | None = Field(default=None, ge=-40, le=150)
    battery_temp_c: float | None = Field(default=None, ge=-40, le=90)
    ambient_temp_c: float | None = Field(default=None, ge=-50, le=60)
    heat_soak_c: float | None = Field(default=None, ge=0, le=80)

    def apply(self, state: VehicleState) -> VehicleState:
        changes = self.model_dump(exclude={"at_s"}, exclude_none=True)
        if changes.get("plugged_in") is False and "charging" not in changes:
            changes["charging"] = False  # unplugging ends the charge
        if changes.get("plugged_in") is True and "charging" not in changes:
            changes["charging"] = True  # plugging in starts it
        new = state.model_copy(update=changes)
        if new.charging and not new.plugged_in:
            raise ValueError("charging = true while plugged_in = false")
        return new


class Scenario(_Strict):
    description: str = ""
    car: CarModel = CarModel()
    initial: VehicleState = VehicleState()
    events: tuple[ScenarioEvent, ...] = ()

    @model_validator(mode="after")
    def _ordered(self) -> Scenario:
        times = [e.at_s for e in self.events]
        if times != sorted(times):
            raise ValueError("events must be in order of at_s")
        state = self.initial
        for i, event in enumerate(self.events):
            try:
                state = event.apply(state)
            except ValueError as exc:
                raise ValueError(f"event {i} (at_s = {event.at_s}): {exc}") from None
        return self


def load_scenario(path: Path) -> Scenario:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc}") from None
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise ScenarioError(f"scenario {path}: `{loc or '(file)'}`: {msg}") from None
