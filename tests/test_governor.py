"""The power governor's control law against a simulated plant: cap steps, noise, load changes."""

from __future__ import annotations

import random

import pytest

from agent.core.governor import PowerGovernor


def simulate(
    gov: PowerGovernor,
    *,
    periods: int,
    span_at,
    cap_at,
    noise_w: float = 0.0,
    idle_w: float = 4.0,
    seed: int = 1,
) -> list[tuple[float, float, float]]:
    """Run the loop: the plant draws idle + duty * span (+ sensor noise). Returns (cap, power, duty)."""
    rng = random.Random(seed)
    trace = []
    for k in range(periods):
        cap = cap_at(k)
        if cap != gov.cap_w:
            gov.set_cap(cap)
        duty = gov.duty
        true_power = idle_w + duty * span_at(k)
        measured = true_power + rng.gauss(0.0, noise_w)
        gov.update(measured, duty)
        trace.append((cap, true_power, duty))
    return trace


def test_starts_conservative_and_learns_the_plant_in_one_period():
    """With no model of the plant yet, the first period runs at a low duty, under the cap; from
    the second on, power sits just under the cap."""
    gov = PowerGovernor(cap_w=15.0, idle_w=4.0)
    trace = simulate(gov, periods=40, span_at=lambda k: 26.0, cap_at=lambda k: 15.0)
    assert trace[0][1] < 15.0
    for _, power, _ in trace[1:]:
        assert 15.0 * 0.95 <= power <= 15.0


def test_a_new_cap_is_met_within_two_periods():
    """After a cap step (15 W -> 9 W -> 25 W) power is within 5 % of the new cap two periods later."""
    gov = PowerGovernor(cap_w=15.0, idle_w=4.0, span_w=26.0)
    caps = lambda k: 15.0 if k < 20 else (9.0 if k < 40 else 25.0)  # noqa: E731
    trace = simulate(gov, periods=60, span_at=lambda k: 26.0, cap_at=caps)
    for step in (20, 40):
        cap = caps(step)
        for _, power, _ in trace[step + 1 : step + 20]:
            assert power == pytest.approx(cap, rel=0.05)


def test_cap_above_full_power_runs_flat_out():
    """A cap above what the worker can draw leaves it at full duty."""
    gov = PowerGovernor(cap_w=100.0, idle_w=4.0)
    trace = simulate(gov, periods=10, span_at=lambda k: 26.0, cap_at=lambda k: 100.0)
    assert trace[-1][2] == 1.0


def test_noisy_sensor_rarely_exceeds_the_cap():
    """With ±1 W sensor noise, fewer than 1 % of periods are more than 5 % over the cap."""
    gov = PowerGovernor(cap_w=15.0, idle_w=4.0)
    trace = simulate(gov, periods=2000, span_at=lambda k: 26.0, cap_at=lambda k: 15.0, noise_w=1.0)
    over = sum(p > 15.0 * 1.05 for _, p, _ in trace[5:])
    assert over / len(trace) < 0.01
    mean = sum(p for _, p, _ in trace[5:]) / len(trace[5:])
    assert mean == pytest.approx(15.0 * 0.97, rel=0.03)


def test_load_change_is_followed():
    """When the model's power doubles mid-run, the duty halves and power returns under the cap."""
    gov = PowerGovernor(cap_w=15.0, idle_w=4.0)
    trace = simulate(
        gov, periods=80, span_at=lambda k: 13.0 if k < 30 else 26.0, cap_at=lambda k: 15.0
    )
    assert trace[29][2] > 0.75
    late = [power for _, power, _ in trace[32:]]
    assert all(power <= 15.0 * 1.05 for power in late)
    assert trace[-1][2] == pytest.approx((15.0 * 0.97 - 4.0) / 26.0, rel=0.05)
