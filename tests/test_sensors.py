"""Rig sensor readers against fake sysfs trees and recorded command outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.core.gate import Gate, GatePolicy, GateReason
from agent.vehicle.emulated import EmulatedVehicle
from agent.vehicle.host import HostVehicle, discover_power
from agent.vehicle.scenario import Scenario
from agent.vehicle.sensors import SensorError
from agent.vehicle.sensors.ina3221 import Ina3221Power
from agent.vehicle.sensors.mains import MainsSupply
from agent.vehicle.sensors.rapl import RaplPower, energy_delta_uj
from agent.vehicle.sensors.thermal import HottestZone
from agent.vehicle.sensors.vcgencmd import PmicPower, parse_pmic_adc, parse_throttled

# Recorded on a Raspberry Pi 5 (firmware 2024-09), idle, 5.1 V USB-C supply.
PMIC_ADC = """\
     3V7_WL_SW_A current(0)=0.00000000A
       3V3_SYS_A current(1)=0.05562372A
       1V8_SYS_A current(2)=0.17174800A
      DDR_VDD2_A current(3)=0.02635220A
      DDR_VDDQ_A current(4)=0.00000000A
       1V1_SYS_A current(5)=0.18933060A
       0V8_SYS_A current(6)=0.33379500A
      VDD_CORE_A current(7)=0.71638000A
       3V3_DAC_A current(17)=0.00048840A
       3V3_ADC_A current(18)=0.00042735A
       0V8_AON_A current(16)=0.00067158A
          HDMI_A current(22)=0.02246640A
     3V7_WL_SW_V volt(8)=3.67733600V
       3V3_SYS_V volt(9)=3.30988700V
       1V8_SYS_V volt(10)=1.79925400V
      DDR_VDD2_V volt(11)=1.11164800V
      DDR_VDDQ_V volt(12)=0.60585600V
       1V1_SYS_V volt(13)=1.10553200V
       0V8_SYS_V volt(14)=0.80073240V
      VDD_CORE_V volt(15)=0.88100600V
       3V3_DAC_V volt(20)=3.31501300V
       3V3_ADC_V volt(21)=3.31745300V
       0V8_AON_V volt(19)=0.79890100V
          HDMI_V volt(23)=5.13848000V
         EXT5V_V volt(24)=5.13848000V
          BATT_V volt(25)=0.00000000V
"""


def put(root: Path, path: str, text: str) -> Path:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text + "\n")
    return p


def pi_tree(root: Path) -> None:
    put(root, "/sys/class/thermal/thermal_zone0/type", "cpu-thermal")
    put(root, "/sys/class/thermal/thermal_zone0/temp", "52612")
    put(root, "/sys/class/power_supply/AC/type", "Mains")
    put(root, "/sys/class/power_supply/AC/online", "1")


def x86_tree(root: Path, energy_uj: int = 1_000_000) -> None:
    put(root, "/sys/class/thermal/thermal_zone0/type", "acpitz")
    put(root, "/sys/class/thermal/thermal_zone0/temp", "41000")
    put(root, "/sys/class/thermal/thermal_zone1/type", "x86_pkg_temp")
    put(root, "/sys/class/thermal/thermal_zone1/temp", "63000")
    put(root, "/sys/class/power_supply/BAT0/type", "Battery")
    put(root, "/sys/class/power_supply/AC/type", "Mains")
    put(root, "/sys/class/power_supply/AC/online", "0")
    base = "/sys/class/powercap/intel-rapl:0"
    put(root, f"{base}/name", "package-0")
    put(root, f"{base}/energy_uj", str(energy_uj))
    put(root, f"{base}/max_energy_range_uj", "262143328850")
    put(root, "/sys/class/powercap/intel-rapl:0:0/name", "core")
    put(root, "/sys/class/powercap/intel-rapl:0:0/energy_uj", "5")


def test_hottest_thermal_zone_in_degrees(tmp_path):
    """Zones read in m°C are reported in °C; the hottest wins, with its path as source."""
    x86_tree(tmp_path)
    temp, source = HottestZone(tmp_path).read_c()
    assert temp == 63.0
    assert source.endswith("thermal_zone1/temp")


def test_thermal_nonsense_and_absence_are_sensor_errors(tmp_path):
    """A missing class or an absurd reading is a SensorError saying where."""
    with pytest.raises(SensorError, match="no thermal zones"):
        HottestZone(tmp_path)
    put(tmp_path, "/sys/class/thermal/thermal_zone0/temp", "999999999")
    with pytest.raises(SensorError, match="no thermal zone could be read"):
        HottestZone(tmp_path).read_c()
    put(tmp_path, "/sys/class/thermal/thermal_zone0/temp", "hot")
    with pytest.raises(SensorError, match="no thermal zone could be read"):
        HottestZone(tmp_path).read_c()


def test_mains_online(tmp_path):
    """Only supplies of type Mains count; online '1' means plugged in."""
    x86_tree(tmp_path)
    assert MainsSupply(tmp_path).online()[0] is False
    put(tmp_path, "/sys/class/power_supply/AC/online", "1")
    assert MainsSupply(tmp_path).online()[0] is True


def test_rapl_power_from_counter_difference(tmp_path):
    """Power is the energy counter's difference over time; subzones are not double counted."""
    x86_tree(tmp_path, energy_uj=1_000_000)
    rapl = RaplPower(tmp_path)
    assert rapl.read_w(100.0) is None
    put(tmp_path, "/sys/class/powercap/intel-rapl:0/energy_uj", str(1_000_000 + 12_500_000))
    assert rapl.read_w(101.0) == pytest.approx(12.5)
    assert rapl.source == "rapl:package-0"


def test_rapl_counter_wrap():
    """A counter that wrapped at max_energy_range_uj gives the true difference."""
    assert energy_delta_uj(before=262143328800, after=50, max_range_uj=262143328850) == 100
    assert energy_delta_uj(before=10, after=30, max_range_uj=100) == 20


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_rapl_permission_denied_says_what_to_do(tmp_path):
    """An energy counter the agent may not read is a SensorError that explains the fix."""
    x86_tree(tmp_path)
    (tmp_path / "sys/class/powercap/intel-rapl:0/energy_uj").chmod(0)
    with pytest.raises(SensorError, match=r"root-only since Linux 5\.10"):
        RaplPower(tmp_path).read_w(1.0)


def test_permission_message_is_produced_for_unreadable_files(tmp_path, monkeypatch):
    """PermissionError from the kernel becomes the explanatory SensorError (checked as root too)."""
    x86_tree(tmp_path)
    rapl = RaplPower(tmp_path)

    def denied(self: Path) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(SensorError, match=r"permission denied reading .*energy_uj"):
        rapl.read_w(1.0)


def test_jetson_hwmon_layout_uses_vdd_in(tmp_path):
    """Mainline INA3221 hwmon: power of VDD_IN = mV x mA, found by glob."""
    hw = "/sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    put(tmp_path, f"{hw}/in1_label", "VDD_IN")
    put(tmp_path, f"{hw}/in1_input", "5072")
    put(tmp_path, f"{hw}/curr1_input", "1424")
    put(tmp_path, f"{hw}/in2_label", "VDD_CPU_GPU_CV")
    put(tmp_path, f"{hw}/in2_input", "5056")
    put(tmp_path, f"{hw}/curr2_input", "400")
    sensor = Ina3221Power(tmp_path)
    assert sensor.read_w(0.0) == pytest.approx(5.072 * 1.424)
    assert "VDD_IN" in sensor.source


def test_jetson_iio_layout_sums_rails_without_a_total(tmp_path):
    """Old L4T iio driver: in_power*_input in mW per named rail; summed when no input rail exists."""
    dev = "/sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    put(tmp_path, f"{dev}/rail_name_0", "VDD_SYS_GPU")
    put(tmp_path, f"{dev}/in_power0_input", "1520")
    put(tmp_path, f"{dev}/rail_name_1", "VDD_SYS_CPU")
    put(tmp_path, f"{dev}/in_power1_input", "480")
    assert Ina3221Power(tmp_path).read_w(0.0) == pytest.approx(2.0)


def test_no_jetson_rails_is_a_sensor_error(tmp_path):
    """A tree without either driver's files is a SensorError naming both."""
    with pytest.raises(SensorError, match="ina3221 hwmon and ina3221x iio"):
        Ina3221Power(tmp_path)


def test_pi5_pmic_rails_are_volts_times_amps():
    """Recorded `pmic_read_adc`: rails with both _A and _V lines give watts; EXT5V alone does not."""
    rails = parse_pmic_adc(PMIC_ADC)
    assert rails["VDD_CORE"] == pytest.approx(0.71638 * 0.881006)
    assert "EXT5V" not in rails and "BATT" not in rails
    assert PmicPower(lambda args: PMIC_ADC).read_w(0.0) == pytest.approx(sum(rails.values()))


@pytest.mark.parametrize(
    ("text", "under_voltage", "throttled", "soft_temp"),
    [
        ("throttled=0x0", False, False, False),
        ("throttled=0x50005", True, True, False),
        ("throttled=0x8", False, False, True),
    ],
)
def test_throttled_flags(text, under_voltage, throttled, soft_temp):
    """`get_throttled` bits: 0x1 under-voltage, 0x4 throttled, 0x8 soft temperature limit."""
    t = parse_throttled(text)
    assert (t.under_voltage, t.throttled, t.soft_temp_limit) == (
        under_voltage,
        throttled,
        soft_temp,
    )


@pytest.mark.parametrize("text", ["", "throttled=", 'error=1 error_msg="Command not registered"'])
def test_bad_vcgencmd_output_is_a_sensor_error(text):
    """Output that is not what vcgencmd prints is a SensorError, never a crash."""
    with pytest.raises(SensorError):
        parse_throttled(text)
    with pytest.raises(SensorError):
        parse_pmic_adc(text)


def test_missing_vcgencmd_binary_is_explained(tmp_path):
    """Choosing the PMIC on a machine without vcgencmd says what to install."""
    with pytest.raises(SensorError, match="not found"):
        discover_power(tmp_path, "pmic", vcgencmd=str(tmp_path / "no-vcgencmd"))


def test_auto_discovery_finds_rapl_and_lists_what_it_tried(tmp_path):
    """`auto` picks the first sensor present; with none, the error lists each attempt."""
    with pytest.raises(SensorError, match=r"rapl: .*ina3221: .*pmic: "):
        discover_power(tmp_path, "auto", vcgencmd=str(tmp_path / "none"))
    x86_tree(tmp_path)
    assert isinstance(discover_power(tmp_path, "auto"), RaplPower)
    assert discover_power(tmp_path, "none") is None


def test_host_vehicle_combines_real_sensors_with_the_emulated_drive_state(tmp_path):
    """On a rig, temperature and mains come from sysfs, gear from the emulator; sources say so."""
    pi_tree(tmp_path)
    car = HostVehicle(
        EmulatedVehicle(Scenario(), started_at=0.0),
        thermal=HottestZone(tmp_path),
        mains=MainsSupply(tmp_path),
        power=PmicPower(lambda args: PMIC_ADC),
    )
    snap = car.snapshot(1.0)
    assert snap.compute_temp_c == pytest.approx(52.612)
    assert snap.plugged_in and snap.charging
    assert snap.compute_power_w == pytest.approx(sum(parse_pmic_adc(PMIC_ADC).values()))
    assert snap.sources["compute_temp_c"].startswith("sysfs:")
    assert snap.sources["gear"] == "emulated"
    assert snap.faults == ()


def test_a_failing_sensor_closes_the_gate(tmp_path):
    """A thermal zone that vanishes is a fault: the gate closes with sensor_fault (fail safe)."""
    pi_tree(tmp_path)
    car = HostVehicle(
        EmulatedVehicle(Scenario(), started_at=0.0),
        thermal=HottestZone(tmp_path),
        mains=MainsSupply(tmp_path),
        power=None,
    )
    gate = Gate(GatePolicy(opted_in=True, hold_s=0))
    assert gate.evaluate(car.snapshot(1.0)).open
    (tmp_path / "sys/class/thermal/thermal_zone0/temp").unlink()
    decision = gate.evaluate(car.snapshot(2.0))
    assert GateReason.SENSOR_FAULT in decision.reasons
    assert not decision.open
