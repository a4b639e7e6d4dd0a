"""The gate as pure code: rules, hysteresis, hold time, and properties under noise."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.gate import Gate, GatePolicy, GateReason
from agent.vehicle.snapshot import Gear, VehicleSnapshot

POLICY = GatePolicy(opted_in=True, max_compute_temp_c=80.0, resume_margin_c=5.0, hold_s=30.0)


def snap(at: float = 0.0, **kw: object) -> VehicleSnapshot:
    base: dict[str, object] = dict(
        gear=Gear.PARK, plugged_in=True, charging=True, compute_temp_c=40.0
    )
    base.update(kw)
    return VehicleSnapshot(at=at, **base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("policy", "snapshot", "reasons"),
    [
        (POLICY, snap(), ()),
        (GatePolicy(opted_in=False, max_compute_temp_c=80), snap(), (GateReason.NOT_OPTED_IN,)),
        (POLICY, snap(gear=Gear.DRIVE), (GateReason.NOT_PARKED,)),
        (POLICY, snap(gear=Gear.NEUTRAL), (GateReason.NOT_PARKED,)),
        (
            POLICY,
            snap(plugged_in=False, charging=False),
            (GateReason.UNPLUGGED, GateReason.NOT_CHARGING),
        ),
        (POLICY, snap(charging=False), (GateReason.NOT_CHARGING,)),
        (POLICY, snap(compute_temp_c=80.0), (GateReason.COMPUTE_TOO_HOT,)),
        (POLICY, snap(compute_temp_c=79.9), ()),
    ],
    ids=[
        "all-good",
        "not-opted-in",
        "drive",
        "neutral",
        "unplugged",
        "not-charging",
        "at-limit",
        "just-below",
    ],
)
def test_each_rule_closes_the_gate_with_its_reason(policy, snapshot, reasons):
    """A fresh gate opens only when every rule holds, and names each rule that does not."""
    decision = Gate(policy).evaluate(snapshot)
    assert decision.reasons == reasons
    assert decision.open is (reasons == ())


def test_temperature_hysteresis_needs_the_margin_to_resume():
    """Once too hot, the gate stays closed until the module is below max - margin."""
    gate = Gate(GatePolicy(opted_in=True, max_compute_temp_c=80, resume_margin_c=5, hold_s=0))
    assert gate.evaluate(snap(0, compute_temp_c=81)).open is False
    assert gate.evaluate(snap(1, compute_temp_c=78)).reasons == (GateReason.COMPUTE_TOO_HOT,)
    assert gate.evaluate(snap(2, compute_temp_c=75.1)).open is False
    assert gate.evaluate(snap(3, compute_temp_c=74.9)).open is True


def test_closing_is_instant_and_reopening_waits_for_the_hold():
    """Leaving park closes at once; parking again reopens only after hold_s."""
    gate = Gate(POLICY)
    assert gate.evaluate(snap(0)).open
    closed = gate.evaluate(snap(10, gear=Gear.DRIVE))
    assert closed.open is False and closed.changed
    held = gate.evaluate(snap(20))
    assert held.open is False and held.reasons == (GateReason.HOLDING,)
    assert gate.evaluate(snap(39.9)).open is False
    reopened = gate.evaluate(snap(40.0))
    assert reopened.open and reopened.changed


def test_first_good_snapshot_opens_without_hold():
    """An agent that starts on a good car does not wait out a hold it never earned."""
    assert Gate(POLICY).evaluate(snap(0)).open


_snapshots = st.builds(
    lambda gear, plugged, charging, temp: (gear, plugged, plugged and charging, temp),
    st.sampled_from(list(Gear)),
    st.booleans(),
    st.booleans(),
    st.floats(min_value=60, max_value=95, allow_nan=False),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_snapshots, min_size=1, max_size=200), st.booleans())
def test_gate_never_open_while_a_hard_condition_is_false(states, opted_in):
    """Property: whatever the sequence, an open decision means every hard condition held."""
    gate = Gate(GatePolicy(opted_in=opted_in, max_compute_temp_c=80, resume_margin_c=5, hold_s=3))
    for i, (gear, plugged, charging, temp) in enumerate(states):
        d = gate.evaluate(
            snap(i * 0.5, gear=gear, plugged_in=plugged, charging=charging, compute_temp_c=temp)
        )
        if d.open:
            assert opted_in and gear is Gear.PARK and plugged and charging and temp < 80


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(min_value=70, max_value=90, allow_nan=False), min_size=2, max_size=300),
    st.floats(min_value=0.01, max_value=2.0),
)
def test_gate_never_reopens_faster_than_its_hold_under_noise(temps, step):
    """Property: a temperature hovering at the limit cannot reopen the gate within hold_s of a close."""
    hold = 5.0
    gate = Gate(GatePolicy(opted_in=True, max_compute_temp_c=80, resume_margin_c=2, hold_s=hold))
    last_close: float | None = None
    for i, temp in enumerate(temps):
        now = i * step
        d = gate.evaluate(snap(now, compute_temp_c=temp))
        if d.changed and not d.open:
            last_close = now
        if d.changed and d.open and last_close is not None:
            assert now - last_close >= hold
