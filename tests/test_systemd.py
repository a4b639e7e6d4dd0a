"""The systemd unit: notify and watchdog wired, restart policy, and a sandbox that scores well."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "edge-agent.service"


def _settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_uses_notify_watchdog_and_does_not_restart_loop_on_bad_config():
    """Type=notify with a watchdog, reload by SIGHUP, and exit 78 excluded from restarts."""
    s = _settings()
    assert s["Type"] == ["notify"]
    assert s["WatchdogSec"] == ["30"]
    assert s["RestartPreventExitStatus"] == ["78"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["DynamicUser"] == ["yes"]
    assert s["CapabilityBoundingSet"] == [""]


def test_syscall_filter_keeps_what_the_worker_memory_limit_needs():
    """@resources (setrlimit, prlimit64) stays allowed: the worker limits its own memory."""
    denied = " ".join(v for v in _settings()["SystemCallFilter"] if v.startswith("~"))
    assert "@resources" not in denied


ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_exposure_level_is_at_most_2():
    """`systemd-analyze security --offline=true` rates the unit 2.0 or better."""
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for edge-agent.service: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert float(match.group(1)) <= 2.0
