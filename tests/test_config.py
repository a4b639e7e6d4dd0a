"""The owner's config file: valid files load, every bad one is refused with key, value and rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, parse_config
from agent.exitcodes import ExitCode

GOOD = """
[owner]
opted_in = true
consent_version = "2026-11"
consent_date = 2026-11-01

[vehicle]
id = "veh-001"

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


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("[vehicle]", "[vehicle]\ncolour = 'red'"),
            "`vehicle.colour`: unknown key (check its spelling; docs/config.md lists every key)",
        ),
        (
            ('id = "veh-001"', 'id = "veh/001"'),
            "`vehicle.id` = 'veh/001': String should match pattern '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'",
        ),
        (
            ("[models]", "[limits]\nmax_compute_temp_c = 0\n[models]"),
            "`limits.max_compute_temp_c` = 0: Input should be greater than 0",
        ),
        (
            ("[models]", "[limits]\nmax_compute_temp_c = 'hot'\n[models]"),
            "`limits.max_compute_temp_c` = 'hot': Input should be a valid number, unable to parse "
            "string as a number",
        ),
        (
            ("[models]", "[broker]\nport = 70000\n[models]"),
            "`broker.port` = 70000: Input should be less than or equal to 65535",
        ),
        (
            ('consent_version = "2026-11"\n', ""),
            "`owner`: opted_in = true needs consent_version and consent_date: record which consent "
            "text the owner agreed to and when",
        ),
        (('[models]\ndir = "models"', ""), "`models`: required key is missing"),
        (
            ("opted_in = true", "opted_in = 'yes please'"),
            "`owner.opted_in` = 'yes please': Input should be a valid boolean, unable to interpret input",
        ),
    ],
    ids=[
        "unknown-key",
        "bad-vehicle-id",
        "zero-temp",
        "not-a-number",
        "port-range",
        "consent-missing",
        "section-missing",
        "not-a-bool",
    ],
)
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
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("[vehicle]", "[vehicle]\ncolour = 1"))
    run = [sys.executable, "-m", "agent.cli", "check-config"]
    ok = subprocess.run([*run, str(good)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "valid" in ok.stdout
    ko = subprocess.run([*run, str(bad)], capture_output=True, text=True, check=False)
    assert ko.returncode == ExitCode.CONFIG
    assert "`vehicle.colour`: unknown key" in ko.stderr


def test_shipped_example_config_is_valid():
    """The commented example in systemd/ passes check-config."""
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "systemd" / "agent.toml.example")
    assert cfg.owner.opted_in is False, "the example must not opt anyone in"
