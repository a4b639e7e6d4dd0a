"""The trusted clock floor (pure): a time the agent knows has passed, so a clock set backwards
cannot make expired jobs valid again, and jobs cannot push it into the future.

Where the floor comes from:
  - at start, the latest of: the floor persisted by earlier runs, the issue time of the
    trust policy held (signed by the fleet's roots), and this build's own date; so even
    a fresh state directory on a car whose clock was set back a day has a floor;
  - each verified job raises it towards its `issued_at`, but never past the local clock's
    reading at that moment. A job may be issued up to the allowed skew ahead of the
    trusted now; if it could raise the floor to its issue time, a run of such jobs would
    walk the floor forward by the skew each time (15 jobs moved it 876 s), and honest
    jobs would then look expired. Bounded by the local clock, the floor can only catch up
    with time that has really passed here.
Trusted now is the later of the local clock and the floor.
"""

from __future__ import annotations


def raised_floor(floor: float, issued_at: float, local_now: float) -> float:
    """The floor after a verified job issued at `issued_at` arrives when the local clock
    reads `local_now`: up to the issue time, never past the local clock, never down."""
    return max(floor, min(issued_at, local_now))


def start_floor(stored: float, policy_issued_at: float | None, built_at: float) -> float:
    """The floor at start: what earlier runs persisted, the held policy's issue time, and
    the date this agent was built (none of these moments can be in the future)."""
    return max(stored, policy_issued_at or 0.0, built_at)


def trusted_now(local_now: float, floor: float) -> float:
    """The local clock, but never earlier than the floor."""
    return max(local_now, floor)
