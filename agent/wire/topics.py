"""The topic tree, v1: one subtree per vehicle so that an ACL can confine a vehicle to its own.

fleet/v1/vehicles/{vehicle_id}/work      vehicle -> dispatcher   WorkRequest
fleet/v1/vehicles/{vehicle_id}/jobs      dispatcher -> vehicle   signed job envelope
fleet/v1/vehicles/{vehicle_id}/events    vehicle -> fleet        JobEvent
fleet/v1/vehicles/{vehicle_id}/results   vehicle -> collector    signed sealed result
fleet/v1/vehicles/{vehicle_id}/status    vehicle -> fleet        VehicleStatus (retained, Last Will)
fleet/v1/policy                          fleet -> every vehicle  root-signed trust policy (retained)
"""

from __future__ import annotations

import re
from enum import StrEnum

PREFIX = "fleet/v1/vehicles"
POLICY_TOPIC = "fleet/v1/policy"

# A vehicle id is one whole topic level and an ACL username: no wildcards, no
# separators, nothing that could widen a pattern (CVE-2017-7650).
VEHICLE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_VEHICLE_ID = re.compile(VEHICLE_ID_PATTERN)


class Channel(StrEnum):
    WORK = "work"
    JOBS = "jobs"
    EVENTS = "events"
    RESULTS = "results"
    STATUS = "status"


def check_vehicle_id(vehicle_id: str) -> str:
    """Return `vehicle_id` if it is a safe single topic level, else raise ValueError."""
    if not _VEHICLE_ID.fullmatch(vehicle_id):
        raise ValueError(
            f"vehicle id {vehicle_id!r} is not allowed: use 1-64 characters from "
            "A-Z a-z 0-9 _ . - starting with a letter or digit"
        )
    return vehicle_id


def topic(vehicle_id: str, channel: Channel) -> str:
    return f"{PREFIX}/{check_vehicle_id(vehicle_id)}/{channel.value}"


def all_vehicles(channel: Channel) -> str:
    """The fleet side's subscription filter for one channel of every vehicle."""
    return f"{PREFIX}/+/{channel.value}"


def parse_topic(name: str) -> tuple[str, Channel] | None:
    """(vehicle_id, channel) for a topic of this tree, or None for anything else."""
    parts = name.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != PREFIX:
        return None
    try:
        return check_vehicle_id(parts[3]), Channel(parts[4])
    except ValueError:
        return None
