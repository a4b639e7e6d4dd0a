"""The trusted clock floor as pure code (agent.core.clock)."""

from __future__ import annotations

import pytest

from agent.core.clock import raised_floor, start_floor, trusted_now


@pytest.mark.parametrize(
    ("floor", "issued_at", "local_now", "expected"),
    [
        (100.0, 150.0, 120.0, 120.0),  # issued ahead: only as far as the local clock
        (100.0, 110.0, 120.0, 110.0),  # issued in the past: up to the issue time
        (100.0, 90.0, 120.0, 100.0),  # never down
        (100.0, 150.0, 50.0, 100.0),  # clock behind: the floor holds
        (100.0, 120.0, 120.0, 120.0),
    ],
)
def test_the_floor_rises_only_as_far_as_the_local_clock(floor, issued_at, local_now, expected):
    assert raised_floor(floor, issued_at, local_now) == expected


def test_jobs_issued_ahead_cannot_walk_the_floor_forward():
    floor = 0.0
    for i in range(1500):  # a day of jobs each issued 59 s ahead of the last
        floor = raised_floor(floor, 1000.0 + 59.0 * (i + 1), 1000.0)
    assert floor == 1000.0


@pytest.mark.parametrize(
    ("stored", "policy", "built", "expected"),
    [
        (5.0, 7.0, 6.0, 7.0),
        (5.0, None, 6.0, 6.0),
        (9.0, 7.0, 6.0, 9.0),
        (0.0, None, 0.0, 0.0),
    ],
)
def test_the_floor_at_start_is_the_latest_known_moment(stored, policy, built, expected):
    assert start_floor(stored, policy, built) == expected


@pytest.mark.parametrize(
    ("local", "floor", "expected"), [(10.0, 5.0, 10.0), (5.0, 10.0, 10.0), (7.0, 7.0, 7.0)]
)
def test_trusted_now_is_never_below_the_floor(local, floor, expected):
    assert trusted_now(local, floor) == expected
