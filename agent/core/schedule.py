"""The owner's allowed hours: per weekday, a list of "HH:MM-HH:MM" windows in local time (pure).

"00:00-24:00" is the whole day; a window may not wrap past midnight (write two:
"22:00-24:00" today and "00:00-06:00" tomorrow). Windows are half-open:
"08:00-09:00" allows 08:00:00 up to, not including, 09:00:00.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")


def parse_window(text: str) -> tuple[int, int]:
    """Minutes since midnight [start, end) for "HH:MM-HH:MM"; ValueError saying what is wrong."""
    m = _WINDOW.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a window like '22:00-24:00'")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2 != 0):
        raise ValueError(f"{text!r} has an impossible time (use 00:00 to 24:00)")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if end <= start:
        raise ValueError(
            f"{text!r} ends before it starts; split a window that crosses midnight in two"
        )
    return start, end


@dataclass(frozen=True, slots=True)
class AllowedHours:
    """Windows per weekday (0 = Monday); a weekday with no windows allows nothing."""

    windows: tuple[tuple[tuple[int, int], ...], ...]

    @classmethod
    def always(cls) -> AllowedHours:
        return cls(tuple(((0, 1440),) for _ in WEEKDAYS))

    @classmethod
    def from_config(cls, table: Mapping[str, Sequence[str]]) -> AllowedHours:
        """From {"mon": ["00:00-07:00"], ...}; a weekday not named allows the whole day."""
        days = []
        for name in WEEKDAYS:
            if name in table:
                days.append(tuple(parse_window(w) for w in table[name]))
            else:
                days.append(((0, 1440),))
        return cls(tuple(days))

    def allows(self, local: dt.datetime) -> bool:
        minute = local.hour * 60 + local.minute
        return any(start <= minute < end for start, end in self.windows[local.weekday()])

    def next_opening(self, local: dt.datetime) -> dt.datetime | None:
        """When the next allowed window opens after `local` (an aware local time), or None
        when `local` is inside a window or no weekday allows anything. Wall-clock minutes:
        a DST change on the way shifts the answer by the change, as the owner reads it."""
        if self.allows(local):
            return None
        minute = local.hour * 60 + local.minute
        for days_ahead in range(8):
            weekday = (local.weekday() + days_ahead) % 7
            starts = sorted(
                start for start, _ in self.windows[weekday] if days_ahead > 0 or start > minute
            )
            if starts:
                day = local.date() + dt.timedelta(days=days_ahead)
                start = starts[0]
                return dt.datetime.combine(
                    day, dt.time(start // 60, start % 60), tzinfo=local.tzinfo
                )
        return None
