"""Scenario files and the emulated car."""

from __future__ import annotations

import pytest

from agent.vehicle.emulated import EmulatedVehicle
from agent.vehicle.scenario import Scenario, ScenarioError, load_scenario
from agent.vehicle.snapshot import Gear
from tests.support import SCENARIOS


def test_shipped_scenarios_load():
    """Every scenario shipped with the package parses."""
    names = sorted(p.stem for p in SCENARIOS.glob("*.toml"))
    assert {"parked-charging", "driving", "hot-parked", "unplugged-mid-job"} <= set(names)
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


def test_override_pins_a_field():
    """A live override wins over the scenario."""
    car = EmulatedVehicle(Scenario(), started_at=0.0)
    car.set(gear=Gear.DRIVE)
    assert car.snapshot(1.0).gear is Gear.DRIVE


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
