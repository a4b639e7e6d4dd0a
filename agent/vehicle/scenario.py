"""Scenario files: a day (or a test's few seconds) of a car's life as timed events.

    description = "parked at work, charging"
    [initial]
    gear = "P"            # P, R, N or D
    plugged_in = true
    charging = true
    compute_temp_c = 35.0
    ambient_temp_c = 20.0

    [[events]]
    at_s = 12.5           # seconds after the start, in scenario time
    gear = "D"
    plugged_in = false

Each event sets only the fields it names. docs/scenarios.md has the format.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.vehicle.snapshot import Gear


class ScenarioError(Exception):
    """Raised when a scenario file cannot be read or describes an impossible day."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class VehicleState(_Strict):
    gear: Gear = Gear.PARK
    plugged_in: bool = True
    charging: bool = True
    compute_temp_c: float = Field(default=35.0, ge=-40, le=150)
    ambient_temp_c: float = Field(default=20.0, ge=-50, le=60)

    @model_validator(mode="after")
    def _charging_needs_plug(self) -> VehicleState:
        if self.charging and not self.plugged_in:
            raise ValueError("charging = true while plugged_in = false")
        return self


class ScenarioEvent(_Strict):
    at_s: float = Field(ge=0)
    gear: Gear | None = None
    plugged_in: bool | None = None
    charging: bool | None = None
    compute_temp_c: float | None = Field(default=None, ge=-40, le=150)
    ambient_temp_c: float | None = Field(default=None, ge=-50, le=60)

    def apply(self, state: VehicleState) -> VehicleState:
        changes = self.model_dump(exclude={"at_s"}, exclude_none=True)
        if changes.get("plugged_in") is False and "charging" not in changes:
            changes["charging"] = False  # unplugging stops charging
        return state.model_copy(update=changes)


class Scenario(_Strict):
    description: str = ""
    initial: VehicleState = VehicleState()
    events: tuple[ScenarioEvent, ...] = ()

    @model_validator(mode="after")
    def _ordered(self) -> Scenario:
        times = [e.at_s for e in self.events]
        if times != sorted(times):
            raise ValueError("events must be in order of at_s")
        return self

    def state_at(self, elapsed_s: float) -> VehicleState:
        state = self.initial
        for event in self.events:
            if event.at_s > elapsed_s:
                break
            state = event.apply(state)
        return state


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
        raise ScenarioError(f"scenario {path}: `{loc}`: {first['msg']}") from None
