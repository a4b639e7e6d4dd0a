"""The owner's config file: valid files load, every bad one is refused with key, value and rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, parse_config
from agent.kit.exitcodes import ExitCode

GOOD = """
[owner]
opted_in = true
consent_version = "2026-11"
consent_date = 2026-11-01

[vehicle]
id = "veh-001"

[broker]
tls = false

[keys]
vehicle_key = "keys/vehicle.key"
trusted_job_keys = "/etc/edge-agent/trusted.json"

[models]
dir = "models"
"""


def test_good_config_loads_with_defaults_and_resolves_relative_paths(tmp_path):
    """Relative paths resolve against the file's folder; absent sections take their defaults."""
    cfg = parse_config(GOOD, path=tmp_path / "agent.toml")
    assert cfg.owner.opted_in
    assert cfg.keys.vehicle_key == (tmp_path / "keys" / "vehicle.key").resolve()
    assert cfg.keys.trusted_job_keys == Path("/etc/edge-agent/trusted.json")
    assert cfg.limits.max_compute_temp_c == 80.0
    assert cfg.agent.capacity == 2


BAD_CASES = [
    pytest.param(
        ("tls = false", "tls = true"),
        "`broker`: tls = true needs ca_file, cert_file, key_file: the fleet CA, and this "
        "vehicle's certificate and key from `edge-fleet provision` (or a username for a broker "
        "that takes a login)",
        id="tls-without-files",
    ),
    pytest.param(
        ("tls = false", "tls = false\nhost = 'broker.fleet.example'"),
        "`broker`: tls = false is only for a test broker on this machine, not "
        "'broker.fleet.example': set ca_file, cert_file and key_file and keep tls = true",
        id="plaintext-to-a-remote-broker",
    ),
    pytest.param(
        ("[vehicle]", "[vehicle]\ncolour = 'red'"),
        "`vehicle.colour`: unknown key (check its spelling; docs/config.md lists every key)",
        id="unknown-key",
    ),
    pytest.param(
        ('id = "veh-001"', 'id = "veh/001"'),
        "`vehicle.id` = 'veh/001': String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\\Z'",
        id="bad-vehicle-id",
    ),
    pytest.param(
        ("[models]", "[limits]\nmax_compute_temp_c = 0\n[models]"),
        "`limits.max_compute_temp_c` = 0: Input should be greater than 0",
        id="zero-temp",
    ),
    pytest.param(
        ("[models]", "[limits]\nmax_compute_temp_c = 'hot'\n[models]"),
        "`limits.max_compute_temp_c` = 'hot': Input should be a valid number, unable to parse "
        "string as a number",
        id="not-a-number",
    ),
    pytest.param(
        ("tls = false", "tls = false\nport = 70000"),
        "`broker.port` = 70000: Input should be less than or equal to 65535",
        id="port-range",
    ),
    pytest.param(
        ('consent_version = "2026-11"\n', ""),
        "`owner`: opted_in = true needs consent_version and consent_date: record which consent "
        "text the owner agreed to and when",
        id="consent-missing",
    ),
    pytest.param(
        ('[models]\ndir = "models"', ""), "`models`: required key is missing", id="no-section"
    ),
    pytest.param(
        ("opted_in = true", "opted_in = 'yes please'"),
        "`owner.opted_in` = 'yes please': must be true or false (a TOML boolean, without quotes)",
        id="not-a-bool",
    ),
    pytest.param(
        ("[models]", "[limits]\nmax_compute_temp_c = 80\nresume_compute_temp_c = 82\n[models]"),
        "`limits`: resume_compute_temp_c (82.0) must be below max_compute_temp_c (80.0), "
        "or the gate would reopen while still too hot",
        id="resume-above-stop",
    ),
    pytest.param(
        ("[models]", "[limits]\nresume_battery_temp_c = 50\n[models]"),
        "`limits`: resume_battery_temp_c (50.0) must be below max_battery_temp_c (45.0), "
        "or the gate would reopen while still too hot",
        id="battery-resume-above-stop",
    ),
    pytest.param(
        ("[models]", "[limits]\nmin_soc_pct = 30\n[models]"),
        "`limits`: resume_soc_pct (25.0) must be above min_soc_pct (30.0), or the gate would "
        "reopen while the battery is too low",
        id="soc-resume-below-floor",
    ),
    pytest.param(
        ("[models]", "[limits]\npower_cap_w = 0\n[models]"),
        "`limits.power_cap_w` = 0: Input should be greater than 0",
        id="zero-cap",
    ),
    pytest.param(
        ("[models]", "[limits]\ndaily_energy_wh = 0\n[models]"),
        "`limits.daily_energy_wh` = 0: Input should be greater than 0",
        id="zero-energy",
    ),
    pytest.param(
        ("opted_in = true", "opted_in = true\ntimezone = 'Mars/Olympus'"),
        "`owner.timezone` = 'Mars/Olympus': unknown time zone 'Mars/Olympus': use an IANA name "
        "such as 'Europe/Berlin'",
        id="unknown-zone",
    ),
    pytest.param(
        ("[vehicle]", "[owner.hours]\nmon = ['22:00-06:00']\n[vehicle]"),
        "`owner.hours`: mon: '22:00-06:00' ends before it starts; split a window that crosses "
        "midnight in two",
        id="window-backwards",
    ),
    pytest.param(
        ("[vehicle]", "[owner.hours]\ntue = ['25:00-26:00']\n[vehicle]"),
        "`owner.hours`: tue: '25:00-26:00' has an impossible time (use 00:00 to 24:00)",
        id="window-bad-time",
    ),
    pytest.param(
        ("[vehicle]", "[owner.hours]\nmonday = ['00:00-24:00']\n[vehicle]"),
        "`owner.hours.monday`: unknown key: Input should be 'mon', 'tue', 'wed', 'thu', 'fri', "
        "'sat' or 'sun'",
        id="bad-weekday",
    ),
    pytest.param(
        ("opted_in = true", "opted_in = true\naccepted_issuers = ['ABC']"),
        "`owner.accepted_issuers` = ['ABC']: 'ABC' is not a key id (16 lowercase hex characters)",
        id="bad-issuer",
    ),
    pytest.param(
        ('id = "veh-001"', "id = \"veh-001\"\nsource = 'car'"),
        "`vehicle.source` = 'car': Input should be 'emulated' or 'host'",
        id="bad-source",
    ),
    pytest.param(
        ("[models]", "[sensors]\npower = 'psu'\n[models]"),
        "`sensors.power` = 'psu': Input should be 'auto', 'rapl', 'ina3221', 'pmic' or 'none'",
        id="bad-power-sensor",
    ),
    pytest.param(
        (
            'trusted_job_keys = "/etc/edge-agent/trusted.json"',
            'trusted_job_keys = "/etc/edge-agent/trusted.json"\ntrust_policy = "p.json"',
        ),
        "`keys`: name exactly one of trust_policy (the fleet's root-signed policy, for vehicles) "
        "or trusted_job_keys (a fixed key list, for a bench rig)",
        id="two-trust-anchors",
    ),
    pytest.param(
        ('trusted_job_keys = "/etc/edge-agent/trusted.json"', ""),
        "`keys`: name exactly one of trust_policy (the fleet's root-signed policy, for vehicles) "
        "or trusted_job_keys (a fixed key list, for a bench rig)",
        id="no-trust-anchor",
    ),
    pytest.param(
        ('dir = "models"', 'dir = "models"\nallowed_domains = ["", "com/evil"]'),
        "`models.allowed_domains` = ['', 'com/evil']: 'com/evil' is not an operator domain name",
        id="bad-operator-domain",
    ),
    pytest.param(
        ('dir = "models"', 'dir = "models"\nmax_bytes = 10'),
        "`models.max_bytes` = 10: Input should be greater than or equal to 1024",
        id="tiny-model-limit",
    ),
    pytest.param(
        ('dir = "models"', 'dir = "/var/lib/edge-agent/models"'),
        "`(file)`: models.dir /var/lib/edge-agent/models is where installed models live "
        "(<state.dir>/models): point it at the shipped, read-only models instead "
        "(e.g. /usr/share/edge-agent/models)",
        id="shipped-models-in-the-installed-area",
    ),
]


@pytest.mark.parametrize(("edit", "message"), BAD_CASES)
def test_bad_config_is_refused_with_the_exact_message(tmp_path, edit, message):
    """Each bad value is reported with its key, the value and what is allowed."""
    text = GOOD.replace(*edit)
    with pytest.raises(ConfigError) as err:
        parse_config(text, path=tmp_path / "agent.toml")
    assert message in err.value.problems


def test_toml_syntax_error_names_the_line(tmp_path):
    """A TOML syntax error is reported with its line and column."""
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD + "\nbroken = \n", path=tmp_path / "agent.toml")
    assert "not valid TOML" in err.value.problems[0]
    assert "line" in err.value.problems[0]


def test_missing_and_binary_files_are_config_errors(tmp_path):
    """An unreadable or non-UTF-8 file is a ConfigError, not a traceback."""
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "absent.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "bin.toml")


def test_not_opted_in_is_the_default(tmp_path):
    """No [owner] section means no consent: nothing may run."""
    text = GOOD.split("[vehicle]", 1)[1]
    cfg = parse_config("[vehicle]" + text, path=tmp_path / "agent.toml")
    assert cfg.owner.opted_in is False


def test_check_config_cli_exit_codes(tmp_path):
    """`edge-agent check-config` exits 0 on a good file and EX_CONFIG with the problems on a bad one."""
    from tests.support import FleetKeys, write_vehicle

    good = write_vehicle(tmp_path, "veh-001", port=1883, fleet=FleetKeys()).config_path
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("[vehicle]", "[vehicle]\ncolour = 1"))
    run = [sys.executable, "-m", "agent.cli", "check-config"]
    ok = subprocess.run([*run, str(good)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "valid" in ok.stdout
    ko = subprocess.run([*run, str(bad)], capture_output=True, text=True, check=False)
    assert ko.returncode == ExitCode.CONFIG
    assert "`vehicle.colour`: unknown key" in ko.stderr


def test_owner_sections_parse_into_hours_and_zone(tmp_path):
    """Allowed hours and the time zone come through as a working schedule."""
    import datetime as dt

    text = GOOD.replace("opted_in = true", "opted_in = true\ntimezone = 'Europe/Berlin'").replace(
        "[vehicle]", "[owner.hours]\nmon = ['00:00-07:00']\nsun = []\n[vehicle]"
    )
    cfg = parse_config(text, path=tmp_path / "agent.toml")
    hours = cfg.owner.allowed_hours
    monday_6am = dt.datetime(2026, 11, 30, 6, 59, tzinfo=cfg.owner.zone)
    assert hours.allows(monday_6am)
    assert not hours.allows(monday_6am.replace(hour=7, minute=0))
    assert not hours.allows(dt.datetime(2026, 11, 29, 12, 0, tzinfo=cfg.owner.zone))  # Sunday
    assert hours.allows(dt.datetime(2026, 12, 1, 12, 0, tzinfo=cfg.owner.zone))  # Tuesday


def test_shipped_example_config_is_valid():
    """The commented example in systemd/ passes check-config."""
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "systemd" / "agent.toml.example")
    assert cfg.owner.opted_in is False, "the example must not opt anyone in"


def test_environment_overrides_the_file_with_toml_values(tmp_path):
    """EDGE_AGENT_<SECTION>__<KEY> wins over the file; values are read as TOML values, or as
    plain strings when they are not one; relative paths resolve against the file's folder."""
    environ = {
        "EDGE_AGENT_BROKER__PORT": "1884",
        "EDGE_AGENT_OWNER__OPTED_IN": "false",
        "edge_agent_agent__capacity": "3",
        "EDGE_AGENT_VEHICLE__ID": "veh-002",
        "EDGE_AGENT_OWNER__ACCEPTED_JOB_CLASSES": '["ocr", "bench"]',
        "EDGE_AGENT_MODELS__DIR": "elsewhere",
        "PATH": "/usr/bin",  # not ours: ignored
    }
    cfg = parse_config(GOOD, path=tmp_path / "agent.toml", environ=environ)
    assert cfg.broker.port == 1884
    assert cfg.owner.opted_in is False
    assert cfg.agent.capacity == 3
    assert cfg.vehicle.id == "veh-002"
    assert cfg.owner.accepted_job_classes == ("ocr", "bench")
    assert cfg.models.dir == (tmp_path / "elsewhere").resolve()
    assert parse_config(GOOD, path=tmp_path / "agent.toml", environ={}).broker.port != 1884


ENV_BAD_CASES = [
    pytest.param(
        {"EDGE_AGENT_BROKER_PORT": "1884"},
        "environment variable EDGE_AGENT_BROKER_PORT: expected EDGE_AGENT_<SECTION>__<KEY>, "
        "e.g. EDGE_AGENT_BROKER__PORT=1884",
        id="one-underscore",
    ),
    pytest.param(
        {"EDGE_AGENT_CAR__ID": "x"},
        "environment variable EDGE_AGENT_CAR__ID: no section `car` (sections: owner, vehicle, "
        "sensors, limits, broker, keys, models, state, agent)",
        id="unknown-section",
    ),
    pytest.param(
        {"EDGE_AGENT_BROKER__PROT": "1884"},
        "`broker.prot`: unknown key (check its spelling; docs/config.md lists every key) "
        "(set by the environment variable EDGE_AGENT_BROKER__PROT)",
        id="unknown-key",
    ),
    pytest.param(
        {"EDGE_AGENT_OWNER__OPTED_IN": "yes"},
        "`owner.opted_in` = 'yes': must be true or false (a TOML boolean, without quotes) "
        "(set by the environment variable EDGE_AGENT_OWNER__OPTED_IN)",
        id="consent-not-a-boolean",
    ),
    pytest.param(
        {"EDGE_AGENT_BROKER__PORT": "70000"},
        "`broker.port` = 70000: Input should be less than or equal to 65535 "
        "(set by the environment variable EDGE_AGENT_BROKER__PORT)",
        id="port-out-of-range",
    ),
]


@pytest.mark.parametrize(("environ", "message"), ENV_BAD_CASES)
def test_bad_environment_override_is_refused_with_the_variable_named(tmp_path, environ, message):
    """A misspelt or wrong override is an error naming the variable, never silently ignored."""
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD, path=tmp_path / "agent.toml", environ=environ)
    assert message in err.value.problems


def test_check_config_cli_reports_a_bad_environment_override(tmp_path):
    """The override rules hold for the command line too: EX_CONFIG and the variable named."""
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    env = {"PATH": "/usr/bin:/bin", "EDGE_AGENT_AGENT__CAPACITY": "0"}
    ko = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(good)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert ko.returncode == ExitCode.CONFIG
    assert "(set by the environment variable EDGE_AGENT_AGENT__CAPACITY)" in ko.stderr


def test_the_one_agent_toml_builder_writes_configs_the_agent_loads(tmp_path):
    """broker.agent_config.agent_toml, shared by the demo, the tests and the benchmarks: what
    it writes loads, overrides land, None removes a key, raw lines join their section."""
    import datetime as dt

    from broker.agent_config import agent_toml
    from tests.support import MODELS, SCENARIOS

    text = agent_toml(
        "veh-built",
        port=1883,
        scenario=SCENARIOS / "parked-charging.toml",
        models=MODELS,
        trust="keys",
        settings={
            "owner": {"consent_date": dt.date(2026, 12, 1)},
            "limits": {"gate_hold_s": None, "power_cap_w": 12.5},
            "agent": {"capacity": 3},
        },
        raw={"owner": '[owner.hours]\nmon = ["01:00-02:00"]', "agent": "heartbeat_s = 0.7"},
        header='a "quoted" header',
    )
    path = tmp_path / "agent.toml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.vehicle.id == "veh-built"
    assert cfg.broker.port == 1883 and cfg.broker.tls is False
    assert cfg.keys.trusted_job_keys == tmp_path / "trusted-job-keys.json"
    assert cfg.keys.trust_policy is None
    assert cfg.limits.power_cap_w == 12.5
    assert cfg.agent.capacity == 3 and cfg.agent.heartbeat_s == 0.7
    assert "gate_hold_s" not in text
    with pytest.raises(ValueError, match=r"no section \[ownr\]"):
        agent_toml("v", port=1, scenario=tmp_path, models=tmp_path, settings={"ownr": {}})


def test_credentials_directory_in_paths_is_systemds_or_the_folder_beside_the_config(tmp_path):
    """`${CREDENTIALS_DIRECTORY}` in a key path: systemd's folder under the unit
    (LoadCredential=), else `credentials/` beside the config, the folder the unit loads from,
    so that check-config and doctor run by root check the same files."""
    text = GOOD.replace('"keys/vehicle.key"', '"${CREDENTIALS_DIRECTORY}/vehicle.key"')
    under_unit = parse_config(
        text, path=tmp_path / "agent.toml", environ={"CREDENTIALS_DIRECTORY": "/run/credentials/x"}
    )
    assert under_unit.keys.vehicle_key == Path("/run/credentials/x/vehicle.key")
    by_root = parse_config(text, path=tmp_path / "agent.toml", environ={})
    assert by_root.keys.vehicle_key == (tmp_path / "credentials" / "vehicle.key").resolve()
