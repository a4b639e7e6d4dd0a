"""The gate hears the car when it changes, not at the next poll: scenario events on the
emulator, kernel uevents on rigs (recorded formats, and a real netlink socket)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from agent.vehicle.host import HostVehicle
from agent.vehicle.uevents import UeventWatcher, parse_uevent
from tests.support import running_agent, wait_for, write_vehicle

# As a Raspberry Pi's kernel sends them (udevadm monitor --kernel --property), NUL-separated.
AC_OFFLINE = (
    b"change@/devices/platform/soc/soc:power/power_supply/AC\0ACTION=change\0"
    b"DEVPATH=/devices/platform/soc/soc:power/power_supply/AC\0SUBSYSTEM=power_supply\0"
    b"POWER_SUPPLY_NAME=AC\0POWER_SUPPLY_TYPE=Mains\0POWER_SUPPLY_ONLINE=0\0SEQNUM=2816\0"
)
THERMAL_TRIP = (
    b"change@/devices/virtual/thermal/thermal_zone0\0ACTION=change\0"
    b"DEVPATH=/devices/virtual/thermal/thermal_zone0\0SUBSYSTEM=thermal\0NAME=cpu-thermal\0"
    b"TEMP=85012\0TRIP=1\0EVENT=3\0SEQNUM=2817\0"
)
# udev's re-broadcast on group 2 starts with a binary header: never a kernel event.
LIBUDEV = b"libudev\0\xfe\xed\xca\xfe(\0\0\0(\0\0\0\xa4\0\0\0" + b"\0" * 16 + b"ACTION=change\0"


def test_kernel_uevents_parse_into_their_fields():
    """Recorded power_supply and thermal uevents give their action, subsystem and values."""
    ac = parse_uevent(AC_OFFLINE)
    assert ac is not None
    assert ac["ACTION"] == "change" and ac["SUBSYSTEM"] == "power_supply"
    assert ac["POWER_SUPPLY_ONLINE"] == "0"
    trip = parse_uevent(THERMAL_TRIP)
    assert trip is not None and trip["SUBSYSTEM"] == "thermal" and trip["TRIP"] == "1"


@pytest.mark.parametrize(
    "data",
    [LIBUDEV, b"", b"no at sign here\0A=B\0", b"\xff\xfe@\x80\0", b"add@/x\0" + b"A" * 9000],
    ids=["libudev", "empty", "no-action", "not-ascii", "oversized"],
)
def test_what_is_not_a_kernel_uevent_is_ignored(data):
    """udev's re-broadcasts, garbage and oversized datagrams are not events."""
    assert parse_uevent(data) is None


def _trigger(path: str = "/sys/devices/virtual/net/lo/uevent") -> bool:
    try:
        Path(path).write_text("change")
    except OSError:
        return False
    return True


async def test_the_watcher_hears_a_real_kernel_uevent():
    """Through a real netlink socket: a synthetic 'change' on the loopback interface reaches
    the callback for subsystem net (rigs watch power_supply and thermal the same way), and
    other subsystems are filtered out."""
    heard: list[dict[str, str]] = []
    got = asyncio.Event()

    def on_change(fields: dict[str, str]) -> None:
        heard.append(fields)
        got.set()

    watcher = UeventWatcher({"net"}, on_change)
    ignoring = UeventWatcher({"power_supply"}, lambda f: heard.append({"wrong": "1"}))
    why = watcher.start(asyncio.get_running_loop())
    if why is not None:
        pytest.skip(why)
    assert ignoring.start(asyncio.get_running_loop()) is None
    try:
        if not _trigger():
            pytest.skip("cannot write a uevent trigger here")
        await asyncio.wait_for(got.wait(), 5)
        await asyncio.sleep(0.1)
    finally:
        watcher.close()
        ignoring.close()
    assert heard and heard[0]["SUBSYSTEM"] == "net" and heard[0]["ACTION"] == "change"
    assert {"wrong": "1"} not in heard


@pytest.mark.broker
async def test_a_scenario_event_closes_the_gate_at_its_time_not_at_the_next_poll(
    mosquitto, fleet, tmp_path
):
    """With the car looked at only every 5 s, the scenario's move to drive at 1.5 s still closes
    the gate within moments of 1.5 s: the agent wakes for the event itself."""
    scenario = tmp_path / "leaves.toml"
    scenario.write_text(
        'description = "leaves at 1.5 s"\n[initial]\ngear = "P"\nplugged_in = true\n'
        'charging = true\ncompute_temp_c = 38.0\n\n[[events]]\nat_s = 1.5\ngear = "D"\n'
    )
    files = write_vehicle(
        tmp_path, "veh-ev", port=mosquitto.port, fleet=fleet, scenario_path=scenario, extra=""
    )
    text = files.config_path.read_text().replace("vehicle_poll_s = 0.02", "vehicle_poll_s = 5.0")
    files.config_path.write_text(text)
    async with running_agent(files) as agent:
        change_at = agent.status()["scenario"]["started_at"] + 1.5
        await wait_for(lambda: not agent.gate.is_open, timeout=8, what="gate closed")
        decision = agent.gate.last
        assert decision is not None and "not_parked" in [r.value for r in decision.reasons]
        # The next poll would have come up to 5 s after the event; the event's own wake is
        # a timer on the same loop. Half a second is ten times what it needs on a busy box.
        assert decision.at - change_at < 0.5, decision.at - change_at


@pytest.mark.broker
async def test_on_a_rig_a_uevent_closes_the_gate_without_waiting_for_the_poll(
    mosquitto, fleet, tmp_path, monkeypatch
):
    """A rig reading mains from sysfs, looked at only every 5 s: the cable is pulled (the
    sysfs file says offline) and the kernel sends a uevent; the gate closes on the uevent.
    (This machine has no power supply to unplug: the watcher is pointed at the loopback
    interface, whose synthetic uevent stands in for the supply's.)"""
    root = tmp_path / "sysfs"
    for path, text in (
        ("sys/class/thermal/thermal_zone0/type", "cpu-thermal"),
        ("sys/class/thermal/thermal_zone0/temp", "52612"),
        ("sys/class/power_supply/AC/type", "Mains"),
        ("sys/class/power_supply/AC/online", "1"),
    ):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text + "\n")
    monkeypatch.setattr(HostVehicle, "uevent_subsystems", property(lambda self: frozenset({"net"})))
    files = write_vehicle(
        tmp_path, "veh-rig", port=mosquitto.port, fleet=fleet, vehicle='source = "host"'
    )
    text = files.config_path.read_text().replace("vehicle_poll_s = 0.02", "vehicle_poll_s = 5.0")
    files.config_path.write_text(text + f'\n[sensors]\nsysfs_root = "{root}"\npower = "none"\n')
    probe = UeventWatcher({"net"}, lambda f: None)
    if probe.start(asyncio.get_running_loop()) is not None:
        pytest.skip("no kernel uevents here")
    probe.close()
    async with running_agent(files) as agent:
        await wait_for(lambda: agent.gate.is_open, what="gate open")
        await asyncio.sleep(0.2)  # the watch loop is now in its 5 s wait
        (root / "sys/class/power_supply/AC/online").write_text("0\n")
        pulled_at = time.time()
        if not _trigger():
            pytest.skip("cannot write a uevent trigger here")
        with contextlib.suppress(AssertionError):
            await wait_for(lambda: not agent.gate.is_open, timeout=3, what="gate closed")
        assert not agent.gate.is_open, "the gate waited for the poll"
        decision = agent.gate.last
        assert decision is not None and "unplugged" in [r.value for r in decision.reasons]
        assert decision.at - pulled_at < 2.5
