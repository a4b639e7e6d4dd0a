"""Scenario files and the emulated car."""

from __future__ import annotations

import pytest

from agent.vehicle.emulated import EmulatedVehicle
from agent.vehicle.scenario import Scenario, ScenarioError, VehicleState, load_scenario
from agent.vehicle.snapshot import Gear
from tests.support import SCENARIOS


def test_shipped_scenarios_load():
    """Every scenario shipped with the package parses."""
    names = sorted(p.stem for p in SCENARIOS.glob("*.toml"))
    expected = {
        "parked-charging",
        "driving",
        "hot-parked",
        "unplugged-mid-job",
        "commuter-day",
        "hot-afternoon",
    }
    assert expected <= set(names)
    for name in names:
        load_scenario(SCENARIOS / f"{name}.toml")


def test_events_apply_in_time_and_unplugging_stops_charging():
    """State follows the events in order; unplugging ends charging even if the event says nothing of it."""
    sc = load_scenario(SCENARIOS / "unplugged-mid-job.toml")
    car = EmulatedVehicle(sc, started_at=100.0, time_scale=10.0)
    assert car.snapshot(100.0).charging
    s = car.snapshot(102.0)  # 20 s of scenario time
    assert not s.plugged_in and not s.charging and s.gear is Gear.PARK
    assert car.snapshot(102.5).gear is Gear.DRIVE


def test_live_set_changes_the_car_now_and_refuses_nonsense():
    """`set` acts like an event now; impossible or unknown values are refused."""
    car = EmulatedVehicle(Scenario(), started_at=0.0)
    car.set(1.0, gear="D")
    assert car.snapshot(1.0).gear is Gear.DRIVE
    car.set(2.0, plugged_in="false")
    assert not car.snapshot(2.0).charging
    with pytest.raises(ValueError, match="charging = true while plugged_in = false"):
        car.set(3.0, charging=True)
    with pytest.raises(ValueError, match="gear"):
        car.set(3.0, gear="X")
    with pytest.raises(ValueError, match="wings"):
        car.set(3.0, wings=2)


def _car(**initial: object) -> EmulatedVehicle:
    return EmulatedVehicle(Scenario(initial=VehicleState(**initial)), started_at=0.0)


def test_compute_heats_with_power_and_cools_toward_ambient():
    """First-order thermal model: full load warms toward ambient + k*P_max, idle cools back."""
    car = _car(compute_temp_c=20.0, ambient_temp_c=20.0)
    car.attach_load(lambda: 1.0)
    hot = car.snapshot(900.0)  # fifteen minutes at full load, tau = 90 s
    k = car.car.compute_c_per_w
    assert hot.compute_power_w == pytest.approx(car.car.compute_max_w)
    assert hot.compute_temp_c == pytest.approx(20.0 + k * car.car.compute_max_w, abs=0.5)
    car.attach_load(lambda: 0.0)
    cool = car.snapshot(1800.0)
    assert cool.compute_temp_c == pytest.approx(20.0 + k * car.car.compute_idle_w, abs=0.5)


def test_charge_rises_tapers_and_holds_at_full():
    """SoC rises at charger power, tapers above 80 %, and when full the charger carries the loads."""
    car = _car(soc_pct=50.0)
    gained = car.snapshot(3600.0).soc_pct - 50.0
    assert gained == pytest.approx((7.4 - 0.004) / 60.0 * 100, rel=0.02)
    assert car.snapshot(3600.0 * 3.0).charge_power_w < 7400.0, "tapering above 80 %"
    full = car.snapshot(3600.0 * 30)
    assert full.soc_pct == pytest.approx(100.0)
    assert full.charging
    assert full.charge_power_w == pytest.approx(full.compute_power_w)


def test_driving_drains_the_battery():
    """Driving draws drive_kw (plus the idle computer) from the battery."""
    car = _car(soc_pct=50.0, gear="D", plugged_in=False, charging=False)
    assert car.snapshot(3600.0).soc_pct == pytest.approx(50.0 - 12.004 / 60.0 * 100, rel=0.01)


def test_hot_parked_scenario_stays_above_the_limit():
    """The hot-parked scenario keeps the module above an 85 °C limit for an hour."""
    car = EmulatedVehicle(load_scenario(SCENARIOS / "hot-parked.toml"), started_at=0.0)
    assert min(car.snapshot(t).compute_temp_c for t in (0, 60, 600, 3600)) > 85.0


def test_hot_afternoon_crosses_the_limit_and_comes_back():
    """The hot afternoon scenario is cool in the morning, over 80 °C after noon, cool at night."""
    car = EmulatedVehicle(load_scenario(SCENARIOS / "hot-afternoon.toml"), started_at=0.0)
    temps = [car.snapshot(h * 3600.0).compute_temp_c for h in (0.5, 3, 6)]
    assert temps[0] < 40 and temps[1] > 80 and temps[2] < 40


def test_commuter_day_is_parked_and_charging_at_night_and_away_by_day():
    """The commuter's day: charging at 03:00, unplugged at work at noon, charging at 20:00."""
    car = EmulatedVehicle(load_scenario(SCENARIOS / "commuter-day.toml"), started_at=0.0)
    night, noon = car.snapshot(3 * 3600), car.snapshot(12 * 3600)
    evening = car.snapshot(20 * 3600)
    assert night.charging and night.gear is Gear.PARK
    assert not noon.plugged_in and noon.gear is Gear.PARK
    assert evening.charging
    assert noon.soc_pct < night.soc_pct + 40


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[initial]\ngear = 'X'", "initial.gear"),
        (
            "[initial]\nplugged_in = false\ncharging = true",
            "charging = true while plugged_in = false",
        ),
        ("[[events]]\nat_s = 5\n[[events]]\nat_s = 1", "in order"),
        ("[[events]]\nat_s = -1", "events.0.at_s"),
        ("[initial]\nwings = 2", "initial.wings"),
        ("not toml ][", "cannot read scenario"),
    ],
)
def test_bad_scenarios_are_refused_with_the_place(tmp_path, text, needle):
    """A bad scenario file is a ScenarioError naming where it is wrong."""
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=None) as err:
        load_scenario(path)
    assert needle in str(err.value)
