"""Reconnect delays: capped exponential backoff with full jitter, reset only by a connection
that stayed healthy (pure)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class ReconnectBackoff:
    """Delays between connection attempts that reset only after a connection stayed healthy.

    Each delay is uniform in [0, min(cap_s, base_s * factor**attempt)]: full jitter spreads a
    fleet's reconnects after a broker restart instead of having every car knock at the same
    instant. A peer that accepts and then fails (a CONNACK, then the socket closed
    mid-PUBACK) must not reset the backoff: resetting on every CONNACK made an agent
    reconnect 3-4 times a second, forever. So the ceiling grows with every attempt and
    falls back to `base_s` only when the connection that just ended had lasted
    `healthy_after_s`.
    """

    base_s: float = 0.5
    factor: float = 2.0
    cap_s: float = 30.0
    healthy_after_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    _attempt: int = 0
    _connected_at: float | None = None
    _refused: bool = False

    def connected(self, now: float) -> None:
        """A connection is up (CONNACK and subscriptions done) at `now`."""
        self._connected_at = now

    def next_delay(self, now: float) -> float:
        """The wait before the next attempt, after a connection ended or failed at `now`."""
        up_since, self._connected_at = self._connected_at, None
        if self._refused:  # jitter in the upper half: a refused fleet does not knock at once
            self._refused = False
            return self.rng.uniform(self.cap_s / 2, self.cap_s)
        if up_since is not None and now - up_since >= self.healthy_after_s:
            self._attempt = 0
        ceiling = self.ceiling_s
        if ceiling < self.cap_s:
            self._attempt += 1
        return self.rng.uniform(0.0, ceiling)

    def refused(self) -> None:
        """The peer refused us for good (a bad login, banned): no retry soon will change
        that, so the next delays start at the cap, and only a healthy connection resets it."""
        while self.ceiling_s < self.cap_s:
            self._attempt += 1
        self._connected_at = None
        self._refused = True

    @property
    def ceiling_s(self) -> float:
        """The most the next delay can be."""
        return min(self.cap_s, self.base_s * self.factor**self._attempt)
