"""The gate as pure code: every rule, hysteresis, hold time, and properties under noisy input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.gate import Gate, GateInputs, GatePolicy, GateReason
from agent.vehicle.snapshot import Gear, VehicleSnapshot

POLICY = GatePolicy(
    opted_in=True,
    max_compute_temp_c=80.0,
    resume_compute_temp_c=75.0,
    max_battery_temp_c=45.0,
    resume_battery_temp_c=40.0,
    min_soc_pct=20.0,
    resume_soc_pct=25.0,
    daily_energy_wh=100.0,
    hold_s=30.0,
)


def policy(**kw: object) -> GatePolicy:
    base = {f: getattr(POLICY, f) for f in GatePolicy.__dataclass_fields__}
    base.update(kw)
    return GatePolicy(**base)  # type: ignore[arg-type]


def snap(at: float = 0.0, **kw: object) -> VehicleSnapshot:
    base: dict[str, object] = dict(
        gear=Gear.PARK,
        plugged_in=True,
        charging=True,
        compute_temp_c=40.0,
        soc_pct=60.0,
        battery_temp_c=25.0,
    )
    base.update(kw)
    return VehicleSnapshot(at=at, **base)  # type: ignore[arg-type]


def inputs(at: float = 0.0, *, hours: bool = True, energy: float = 0.0, **kw: object) -> GateInputs:
    return GateInputs(snap(at, **kw), within_hours=hours, energy_today_wh=energy)


@pytest.mark.parametrize(
    ("pol", "given_inputs", "reasons"),
    [
        (POLICY, inputs(), ()),
        (policy(opted_in=False), inputs(), (GateReason.NOT_OPTED_IN,)),
        (POLICY, inputs(hours=False), (GateReason.OUTSIDE_HOURS,)),
        (POLICY, inputs(gear=Gear.DRIVE), (GateReason.NOT_PARKED,)),
        (POLICY, inputs(gear=Gear.REVERSE), (GateReason.NOT_PARKED,)),
        (POLICY, inputs(gear=Gear.NEUTRAL), (GateReason.NOT_PARKED,)),
        (
            POLICY,
            inputs(plugged_in=False, charging=False),
            (GateReason.UNPLUGGED, GateReason.NOT_CHARGING),
        ),
        (POLICY, inputs(charging=False), (GateReason.NOT_CHARGING,)),
        (POLICY, inputs(soc_pct=20.0), (GateReason.BATTERY_LOW,)),
        (POLICY, inputs(soc_pct=20.1), ()),
        (POLICY, inputs(battery_temp_c=45.0), (GateReason.BATTERY_TOO_HOT,)),
        (POLICY, inputs(compute_temp_c=80.0), (GateReason.COMPUTE_TOO_HOT,)),
        (POLICY, inputs(compute_temp_c=79.9), ()),
        (POLICY, inputs(energy=100.0), (GateReason.ENERGY_SPENT,)),
        (POLICY, inputs(energy=99.9), ()),
        (POLICY, inputs(faults=("thermal zone unreadable",)), (GateReason.SENSOR_FAULT,)),
        (
            policy(opted_in=False),
            inputs(hours=False, gear=Gear.DRIVE, compute_temp_c=90),
            (
                GateReason.NOT_OPTED_IN,
                GateReason.OUTSIDE_HOURS,
                GateReason.NOT_PARKED,
                GateReason.COMPUTE_TOO_HOT,
            ),
        ),
    ],
    ids=[
        "all-good",
        "not-opted-in",
        "outside-hours",
        "drive",
        "reverse",
        "neutral",
        "unplugged",
        "not-charging",
        "soc-at-floor",
        "soc-above-floor",
        "battery-hot",
        "compute-at-limit",
        "compute-below",
        "energy-spent",
        "energy-left",
        "sensor-fault",
        "many",
    ],
)
def test_each_rule_closes_the_gate_with_its_reason(pol, given_inputs, reasons):
    """A fresh gate opens only when every rule holds, and names each rule that does not."""
    decision = Gate(pol).evaluate(given_inputs)
    assert decision.reasons == reasons
    assert decision.open is (reasons == ())


@pytest.mark.parametrize(
    ("field", "trip", "between", "clear", "reason"),
    [
        ("compute_temp_c", 81.0, 76.0, 74.9, GateReason.COMPUTE_TOO_HOT),
        ("battery_temp_c", 46.0, 41.0, 39.9, GateReason.BATTERY_TOO_HOT),
        ("soc_pct", 19.0, 24.0, 25.1, GateReason.BATTERY_LOW),
    ],
)
def test_thresholds_latch_until_the_resume_value(field, trip, between, clear, reason):
    """Each threshold trips at its limit and clears only past its resume value (hysteresis)."""
    gate = Gate(policy(hold_s=0))
    assert gate.evaluate(inputs(0, **{field: trip})).reasons == (reason,)
    assert gate.evaluate(inputs(1, **{field: between})).reasons == (reason,)
    assert gate.evaluate(inputs(2, **{field: clear})).open is True


def test_closing_is_instant_and_reopening_waits_for_the_hold():
    """Leaving park closes at once; parking again reopens only after hold_s."""
    gate = Gate(POLICY)
    assert gate.evaluate(inputs(0)).open
    closed = gate.evaluate(inputs(10, gear=Gear.DRIVE))
    assert closed.open is False and closed.changed
    held = gate.evaluate(inputs(20))
    assert held.open is False and held.reasons == (GateReason.HOLDING,)
    assert gate.evaluate(inputs(39.9)).open is False
    reopened = gate.evaluate(inputs(40.0))
    assert reopened.open and reopened.changed


def test_first_good_snapshot_opens_without_hold():
    """An agent that starts on a good car does not wait out a hold it never earned."""
    assert Gate(POLICY).evaluate(inputs(0)).open


def test_the_first_decision_is_a_change_open_or_closed():
    """Nothing was decided before it: a gate that starts closed is reported with its reasons
    (logged, in the metrics) just like one that starts open; the next same decision is not."""
    gate = Gate(POLICY)
    first = gate.evaluate(inputs(0, gear=Gear.DRIVE))
    assert first.changed and not first.open and first.reasons == (GateReason.NOT_PARKED,)
    assert not gate.evaluate(inputs(1, gear=Gear.DRIVE)).changed
    opened = Gate(POLICY)
    assert opened.evaluate(inputs(0)).changed
    assert not opened.evaluate(inputs(1)).changed


def test_new_day_reopens_after_energy_allowance():
    """The allowance closes the gate; a new day's zero total reopens it (after the hold)."""
    gate = Gate(policy(hold_s=0))
    assert gate.evaluate(inputs(0, energy=100.0)).reasons == (GateReason.ENERGY_SPENT,)
    assert gate.evaluate(inputs(1, energy=0.0)).open


def test_reloaded_policy_applies_at_next_evaluation():
    """An owner who opts out by reloading the config closes the gate at the next look."""
    gate = Gate(POLICY)
    assert gate.evaluate(inputs(0)).open
    gate.update_policy(policy(opted_in=False))
    assert gate.evaluate(inputs(1)).reasons == (GateReason.NOT_OPTED_IN,)


_hard = st.fixed_dictionaries(
    {
        "gear": st.sampled_from(list(Gear)),
        "plugged_in": st.booleans(),
        "charging": st.booleans(),
        "compute_temp_c": st.floats(min_value=60, max_value=95, allow_nan=False),
        "battery_temp_c": st.floats(min_value=30, max_value=50, allow_nan=False),
        "soc_pct": st.floats(min_value=10, max_value=40, allow_nan=False),
        "hours": st.booleans(),
        "energy": st.floats(min_value=90, max_value=110, allow_nan=False),
        "fault": st.booleans(),
    }
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_hard, min_size=1, max_size=120),
    st.booleans(),
    st.floats(min_value=0.01, max_value=5.0),
)
def test_gate_never_open_while_a_hard_condition_is_false(states, opted_in, step):
    """Property: whatever the sequence, an open decision means every hard condition held."""
    gate = Gate(policy(opted_in=opted_in, hold_s=3))
    for i, s in enumerate(states):
        charging = s["plugged_in"] and s["charging"]
        d = gate.evaluate(
            GateInputs(
                snap(
                    i * step,
                    gear=s["gear"],
                    plugged_in=s["plugged_in"],
                    charging=charging,
                    compute_temp_c=s["compute_temp_c"],
                    battery_temp_c=s["battery_temp_c"],
                    soc_pct=s["soc_pct"],
                    faults=("x",) if s["fault"] else (),
                ),
                within_hours=s["hours"],
                energy_today_wh=s["energy"],
            )
        )
        if d.open:
            assert opted_in and s["gear"] is Gear.PARK and s["plugged_in"] and charging
            assert s["compute_temp_c"] < 80 and s["battery_temp_c"] < 45 and s["soc_pct"] > 20
            assert s["hours"] and s["energy"] < 100 and not s["fault"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(min_value=70, max_value=90, allow_nan=False),
            st.floats(min_value=15, max_value=30, allow_nan=False),
            st.booleans(),
        ),
        min_size=2,
        max_size=300,
    ),
    st.floats(min_value=0.01, max_value=2.0),
)
def test_gate_never_reopens_faster_than_its_hold_under_noise(noise, step):
    """Property: values hovering at their limits cannot reopen the gate within hold_s of a close."""
    hold = 5.0
    gate = Gate(policy(hold_s=hold))
    last_close: float | None = None
    for i, (temp, soc, plugged) in enumerate(noise):
        now = i * step
        d = gate.evaluate(
            inputs(now, compute_temp_c=temp, soc_pct=soc, plugged_in=plugged, charging=plugged)
        )
        if d.changed and not d.open:
            last_close = now
        if d.changed and d.open and last_close is not None:
            assert now - last_close >= hold
