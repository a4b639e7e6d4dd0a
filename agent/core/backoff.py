"""Reconnect delays: capped exponential backoff with full jitter (pure)."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delays(
    *,
    base_s: float = 0.5,
    factor: float = 2.0,
    cap_s: float = 60.0,
    rng: random.Random | None = None,
) -> Iterator[float]:
    """Yield delays uniform in [0, min(cap, base * factor**attempt)], forever.

    Full jitter spreads a fleet's reconnects after a broker restart instead of
    having every car knock at the same instant.
    """
    rand = rng or random.Random()
    attempt = 0
    while True:
        ceiling = min(cap_s, base_s * factor**attempt)
        yield rand.uniform(0.0, ceiling)
        if ceiling < cap_s:
            attempt += 1
