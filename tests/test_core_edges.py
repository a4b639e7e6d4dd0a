"""The pure core at its edges: each boundary on the side it is meant to be, and each
refusal's exact words (what an operator reads in the log at 3 a.m.). Written from the
survivors of mutation testing (`make mutants`); each test names the rule it pins."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from agent.core.admission import HeldModel, InputSpec, admit, check_inputs
from agent.core.energy import EnergyMeter
from agent.core.gate import Gate, GateInputs, GateReason
from agent.core.governor import PowerGovernor
from agent.core.schedule import AllowedHours, parse_window
from agent.wire.errors import Reason, WireError
from agent.wire.messages import ModelRef
from agent.wire.tensors import Tensor
from tests.support import DIGITS_REF, FleetKeys, job_spec
from tests.test_admission import HELD, NOW
from tests.test_admission import ctx as actx
from tests.test_gate import policy, snap

FLEET = FleetKeys()


def refusal(spec_kw: dict[str, object], signer: str | None = None, **ctx_kw: object) -> WireError:
    spec = job_spec(FLEET, "veh-1", issued_at=NOW, **spec_kw)
    with pytest.raises(WireError) as err:
        admit(spec, signer or FLEET.issuer, actx(**ctx_kw))
    return err.value


# ---- admission: boundaries ------------------------------------------------------------


def test_a_job_expires_at_its_expiry_not_after():
    spec = job_spec(FLEET, "veh-1", issued_at=NOW, lifetime_s=60.0)
    assert admit(spec, FLEET.issuer, actx(now=spec.expires_at - 0.001)) is HELD
    with pytest.raises(WireError) as err:
        admit(spec, FLEET.issuer, actx(now=spec.expires_at))
    assert err.value.detail == "job expired 0.0 s ago"
    with pytest.raises(WireError) as err:
        admit(spec, FLEET.issuer, actx(now=spec.expires_at + 2.5))
    assert err.value.detail == "job expired 2.5 s ago"


def test_a_job_issued_exactly_at_the_skew_is_still_valid():
    spec = job_spec(FLEET, "veh-1", issued_at=NOW + 60.0, lifetime_s=600.0)
    assert admit(spec, FLEET.issuer, actx()) is HELD
    late = job_spec(FLEET, "veh-1", issued_at=NOW + 70.5, lifetime_s=600.0)
    with pytest.raises(WireError) as err:
        admit(late, FLEET.issuer, actx())
    assert err.value.detail == "job issued 70.5 s in the future (allowed skew 60 s)"


def test_inputs_exactly_at_the_size_limit_are_admitted():
    spec = job_spec(FLEET, "veh-1", issued_at=NOW)
    size = sum(t.nbytes for t in spec.inputs.values())
    check_inputs(spec, HELD, size)
    with pytest.raises(WireError) as err:
        check_inputs(spec, HELD, size - 1)
    assert err.value.detail == f"inputs total {size} bytes, limit is {size - 1}"


# ---- admission: the words of each refusal ------------------------------------------------


def test_the_words_of_each_admission_refusal():
    other = "0123456789abcdef"
    assert refusal({}, signer=other).detail == (
        f"job claims issuer {FLEET.issuer} but was signed by {other}"
    )
    assert refusal({}, accepted_issuers=frozenset({"x"})).detail == (
        f"the owner does not accept jobs from issuer {FLEET.issuer}"
    )
    assert refusal({}, vehicle_id="veh-2").detail == "job is bound to veh-1, this is veh-2"
    assert refusal({}, seen={("job-1", 1)}).detail == "job job-1 attempt 1 seen before"
    assert refusal({}, models={}).detail == "this vehicle holds no model 'digits'"
    wrong = ModelRef(name="digits", sha256="f" * 64, size=DIGITS_REF.size + 1)
    assert refusal({"model": wrong}).detail == (
        f"job pins digits as sha256 ffffffffffff.. size {DIGITS_REF.size + 1}; "
        f"held copy is {DIGITS_REF.sha256[:12]}.. size {DIGITS_REF.size}"
    )
    y = {"Y": Tensor.from_numpy(np.zeros((1, 64), np.float32))}
    assert refusal({"x": None, "inputs": y}).detail == (
        "inputs ['Y'] do not match the model's ['X']"
    )
    f64 = {"X": Tensor.from_numpy(np.zeros((1, 64), np.float64))}
    assert refusal({"inputs": f64}).detail == "input X is float64, the model wants float32"
    narrow = {"X": Tensor.from_numpy(np.zeros((1, 63), np.float32))}
    assert refusal({"inputs": narrow}).detail == (
        "input X has shape [1, 63], the model wants ['?', 64]"
    )
    flat = {"X": Tensor.from_numpy(np.zeros((64,), np.float32))}
    assert refusal({"inputs": flat}).reason is Reason.BAD_INPUTS
    empty = {"X": Tensor.from_numpy(np.zeros((0, 64), np.float32))}
    err = refusal({"inputs": empty})
    assert (err.reason, err.detail) == (
        Reason.BAD_INPUTS,
        "input X has shape [0, 64]: an empty tensor has nothing to compute",
    )


def test_a_fixed_dimension_is_named_in_the_refusal():
    fixed = HeldModel(
        "digits", DIGITS_REF.sha256, DIGITS_REF.size, {"X": InputSpec("float32", (2, 64))}
    )
    spec = job_spec(FLEET, "veh-1", issued_at=NOW)
    with pytest.raises(WireError) as err:
        check_inputs(spec, fixed, 1 << 20)
    assert err.value.detail == "input X has shape [1, 64], the model wants [2, 64]"


def test_a_low_order_requester_key_is_refused_in_those_words():
    err = refusal({"requester_key": bytes(32)})
    assert (err.reason, err.detail) == (
        Reason.BAD_REQUESTER_KEY,
        "the requester key is a low-order X25519 point: no result could be sealed to it",
    )


# ---- the gate ---------------------------------------------------------------------------------


def test_the_gate_takes_a_bare_snapshot_as_well():
    gate = Gate(policy())
    decision = gate.evaluate(snap(5.0))
    assert decision.open and decision.at == 5.0
    assert gate.last is decision


@pytest.mark.parametrize(
    ("field", "trip", "at_resume", "below"),
    [("compute_temp_c", 80.0, 75.0, 74.9), ("battery_temp_c", 45.0, 40.0, 39.9)],
)
def test_a_hot_latch_clears_only_below_its_resume_temperature(field, trip, at_resume, below):
    gate = Gate(policy(hold_s=0.0))
    assert not gate.evaluate(snap(0.0, **{field: trip})).open
    assert not gate.evaluate(snap(1.0, **{field: at_resume})).open, "at resume: still latched"
    assert gate.evaluate(snap(2.0, **{field: below})).open


def test_a_low_battery_latch_clears_only_above_its_resume_charge():
    gate = Gate(policy(hold_s=0.0))
    assert not gate.evaluate(snap(0.0, soc_pct=20.0)).open
    decision = gate.evaluate(snap(1.0, soc_pct=25.0))
    assert GateReason.BATTERY_LOW in decision.reasons, "at resume: still latched"
    assert gate.evaluate(snap(2.0, soc_pct=25.1)).open


def test_a_gate_closed_from_the_start_waits_its_hold_before_opening():
    gate = Gate(policy(hold_s=10.0))
    assert not gate.evaluate(snap(0.0, plugged_in=False)).open
    held = gate.evaluate(snap(5.0))
    assert (held.open, held.reasons) == (False, (GateReason.HOLDING,))
    assert gate.evaluate(snap(10.0)).open


def test_a_decision_carries_the_snapshots_time_and_is_kept_as_the_last():
    gate = Gate(policy())
    decision = gate.evaluate(GateInputs(snap(42.0), energy_today_wh=1.0))
    assert decision.at == 42.0 and gate.last is decision


# ---- the governor ---------------------------------------------------------------------------


def test_a_nominal_full_power_is_assumed_once_and_only_above_idle():
    gov = PowerGovernor(cap_w=10.0, idle_w=2.0)
    assert gov.assume_full_power(2.0) == gov.start_duty, "not above idle: nothing assumed"
    assert gov.span_w is None
    duty = gov.assume_full_power(12.0)
    assert gov.span_w == 10.0
    assert duty == pytest.approx((10.0 * 0.97 - 2.0) / 10.0)
    assert gov.duty == duty
    gov.assume_full_power(30.0)
    assert gov.span_w == 10.0, "assumed once"


def test_an_assumed_span_gives_way_to_the_first_measurement():
    gov = PowerGovernor(cap_w=10.0, idle_w=2.0)
    gov.assume_full_power(12.0)
    gov.update(avg_power_w=2.0 + 0.5 * 20.0, applied_duty=0.5)  # the plant spans 20 W
    assert gov.span_w == pytest.approx(20.0)


def test_a_span_of_nothing_runs_flat_out():
    gov = PowerGovernor(cap_w=10.0, idle_w=2.0, span_w=1e-6)
    assert gov.set_cap(10.0) == 1.0
    gov = PowerGovernor(cap_w=10.0, idle_w=2.0, span_w=2e-6)
    assert gov.set_cap(10.0) == 1.0, "still below 1 W: clamped to flat out"
    gov = PowerGovernor(cap_w=1.0, idle_w=5.0, span_w=1e-6)
    assert gov.set_cap(1.0) == 1.0, "compute draws nothing: the cap below idle cannot bind"


def test_a_small_span_above_the_floor_is_used_as_it_is():
    gov = PowerGovernor(cap_w=1.0, idle_w=0.5, span_w=1.0)
    assert gov.set_cap(1.0) == pytest.approx(0.97 - 0.5)


def test_a_span_learned_at_first_look_still_needs_two_surprises():
    gov = PowerGovernor(cap_w=100.0, idle_w=0.0)
    gov.update(avg_power_w=0.5 * 20.0, applied_duty=0.5)  # first look: believed
    assert gov.span_w == pytest.approx(20.0)
    gov.update(avg_power_w=0.5 * 30.0, applied_duty=0.5)
    assert gov.span_w == pytest.approx(20.0), "one surprise after learning: not believed"


def test_the_integral_adds_at_most_a_fifth_above_the_feedforward():
    gov = PowerGovernor(cap_w=10.0, idle_w=0.0, span_w=20.0)
    for _ in range(100):
        gov.update(avg_power_w=0.0, applied_duty=0.05)
    assert gov.duty == pytest.approx(9.7 / 20.0 + 0.2)


def test_below_a_tenth_duty_the_plant_is_not_relearned():
    gov = PowerGovernor(cap_w=10.0, idle_w=0.0, span_w=20.0)
    gov.update(avg_power_w=0.1, applied_duty=0.099)
    assert gov.span_w == 20.0
    gov.update(avg_power_w=2.2, applied_duty=0.1)
    assert gov.span_w == pytest.approx(20.0 + 0.15 * 2.0), "at a tenth it learns"


def test_a_single_surprising_period_is_smoothed_two_in_a_row_are_believed():
    gov = PowerGovernor(cap_w=100.0, idle_w=0.0, span_w=20.0)
    gov.update(avg_power_w=0.5 * 30.0, applied_duty=0.5)  # +50 %: one period
    assert gov.span_w == 20.0, "a jump is not smoothed in, and not believed once"
    gov.update(avg_power_w=0.5 * 30.0, applied_duty=0.5)
    assert gov.span_w == pytest.approx(30.0), "twice in a row: believed"
    gov.update(avg_power_w=0.5 * 33.0, applied_duty=0.5)  # +10 %: within the band
    assert gov.span_w == pytest.approx(30.0 + 0.15 * 3.0)


def test_opposite_jumps_in_a_row_are_not_believed():
    gov = PowerGovernor(cap_w=100.0, idle_w=0.0, span_w=20.0)
    gov.update(avg_power_w=0.5 * 30.0, applied_duty=0.5)
    gov.update(avg_power_w=0.5 * 10.0, applied_duty=0.5)
    assert gov.span_w == 20.0


@pytest.mark.parametrize(("factor", "moved"), [(1.25, True), (0.8, True), (1.26, False)])
def test_the_band_edges_are_smoothed_in(factor, moved):
    gov = PowerGovernor(cap_w=100.0, idle_w=0.0, span_w=20.0)
    gov.update(avg_power_w=0.5 * 20.0 * factor, applied_duty=0.5)
    assert (gov.span_w != 20.0) is moved


def test_a_negative_estimate_counts_as_no_power():
    gov = PowerGovernor(cap_w=10.0, idle_w=5.0)
    gov.update(avg_power_w=1.0, applied_duty=0.5)
    assert gov.span_w == 0.0


def test_the_integral_is_bounded_both_ways():
    gov = PowerGovernor(cap_w=10.0, idle_w=0.0, span_w=10.0)
    for _ in range(100):
        gov.update(avg_power_w=30.0 * gov.duty + 0.0, applied_duty=0.05)
    assert gov.duty == pytest.approx(max(0.0, 0.97 - 0.2))
    gov = PowerGovernor(cap_w=10.0, idle_w=0.0, span_w=10.0)
    for _ in range(100):
        gov.update(avg_power_w=0.0, applied_duty=0.05)
    assert gov.duty == pytest.approx(min(1.0, 0.97 + 0.2))


def test_the_error_is_scaled_by_the_span_even_a_small_one():
    gov = PowerGovernor(cap_w=10.0, idle_w=0.0, span_w=0.5)
    gov.update(avg_power_w=9.7, applied_duty=0.05)  # at target: no correction
    assert gov.duty == pytest.approx(1.0)
    gov = PowerGovernor(cap_w=10.0, idle_w=0.0, span_w=0.5, ki=0.001)
    gov.update(avg_power_w=9.6, applied_duty=0.05)
    assert gov._integral == pytest.approx(0.001 * 0.1 / 0.5)


# ---- energy ----------------------------------------------------------------------------------------


def test_a_sample_at_the_same_instant_books_nothing():
    meter = EnergyMeter(day="d")
    meter.sample(10.0, 5.0, "d", ("j", 1))
    assert meter.sample(10.0, 5.0, "d", ("j", 1)) == 0.0
    assert meter.sample(12.0, 5.0, "d", ("j", 1)) == pytest.approx(10.0 / 3600)


def test_a_counter_reading_at_the_same_instant_books_nothing():
    meter = EnergyMeter(day="d")
    meter.sample(10.0, 5.0, "d", None, energy_j=100.0)
    assert meter.sample(10.0, 5.0, "d", ("j", 1), energy_j=460.0) == 0.0


def test_an_unchanged_counter_books_zero_not_the_power_estimate():
    meter = EnergyMeter(day="d")
    meter.sample(0.0, 50.0, "d", None, energy_j=100.0)
    assert meter.sample(1.0, 50.0, "d", ("j", 1), energy_j=100.0) == 0.0


def test_without_a_counter_on_one_side_the_power_is_integrated():
    meter = EnergyMeter(day="d")
    meter.sample(0.0, 10.0, "d", None, energy_j=None)
    assert meter.sample(2.0, 30.0, "d", ("j", 1), energy_j=500.0) == pytest.approx(40.0 / 3600)


def test_a_gap_of_exactly_the_limit_is_still_integrated():
    meter = EnergyMeter(day="d", max_gap_s=5.0)
    meter.sample(0.0, 10.0, "d", None)
    assert meter.sample(5.0, 30.0, "d", ("j", 1)) == pytest.approx(20.0 * 5.0 / 3600)


def test_closing_an_unknown_job_gives_zero():
    meter = EnergyMeter(day="d")
    assert meter.close_job(("nobody", 1)) == 0.0
    assert isinstance(meter.close_job(("nobody", 1)), float)


# ---- allowed hours ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "window", ["00:00-24:59", "00:00-25:00", "00:60-01:00", "00:00-23:60", "24:00-24:00"]
)
def test_impossible_times_are_refused(window):
    with pytest.raises(ValueError, match="impossible time"):
        parse_window(window)


def test_windows_count_minutes_both_ends():
    assert parse_window("01:30-02:45") == (90, 165)
    assert parse_window("00:00-23:59") == (0, 1439)


def _at(hour: int, minute: int) -> dt.datetime:
    return dt.datetime(2026, 12, 7, hour, minute)  # a Monday


def test_a_window_includes_its_start_and_excludes_its_end():
    hours = AllowedHours.from_config({"mon": ["01:00-02:00"]})
    assert not hours.allows(_at(0, 59))
    assert hours.allows(_at(1, 0))
    assert hours.allows(_at(1, 59))
    assert not hours.allows(_at(2, 0))


@pytest.mark.parametrize("build", ["always", "from_config"])
def test_a_day_not_named_allows_every_minute(build):
    hours = AllowedHours.always() if build == "always" else AllowedHours.from_config({"mon": []})
    if build == "from_config":
        assert not hours.allows(_at(12, 0)), "a day named with no windows allows nothing"
        hours = AllowedHours.from_config({})
    assert hours.windows == tuple(((0, 1440),) for _ in range(7))
    assert hours.allows(_at(0, 0)) and hours.allows(_at(23, 59))
