"""The emulated car: plays a scenario against the agent's clock, optionally accelerated."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.vehicle.scenario import Scenario, VehicleState
from agent.vehicle.snapshot import VehicleSnapshot

_SOURCES = {"all": "emulated"}


@dataclass
class EmulatedVehicle:
    """Snapshots follow `scenario`; `override` pins fields (tests, live control)."""

    scenario: Scenario
    started_at: float
    time_scale: float = 1.0
    override: dict[str, object] = field(default_factory=dict)

    def state(self, now: float) -> VehicleState:
        state = self.scenario.state_at((now - self.started_at) * self.time_scale)
        if self.override:
            state = state.model_copy(update=self.override)
        return state

    def snapshot(self, now: float) -> VehicleSnapshot:
        s = self.state(now)
        return VehicleSnapshot(
            at=now,
            gear=s.gear,
            plugged_in=s.plugged_in,
            charging=s.charging and s.plugged_in,
            compute_temp_c=s.compute_temp_c,
            ambient_temp_c=s.ambient_temp_c,
            sources=_SOURCES,
        )

    def set(self, **fields: object) -> None:
        """Pin fields of the state from now on (e.g. gear="D")."""
        self.override.update(fields)
