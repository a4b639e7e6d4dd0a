"""vehicle-edge-agent: lends a parked, charging car's computer to the fleet, safely."""

__version__ = "0.1.0"
