"""The vehicle as the agent sees it: timestamped snapshots behind one small interface."""

from agent.vehicle.snapshot import Gear, VehicleSignals, VehicleSnapshot

__all__ = ["Gear", "VehicleSignals", "VehicleSnapshot"]
