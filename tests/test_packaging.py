"""The install path's pieces that need no container: the README's install section parses
into the rig test's script, the packaging scripts are valid shell, the unit and the
package agree on paths. `make rig-test` runs them for real in booted Debian."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.rig.readme import install_blocks

REPO = Path(__file__).resolve().parents[1]
DEBIAN = REPO / "systemd" / "debian"


def test_the_readme_install_section_is_a_script_for_both_machines():
    blocks = install_blocks(REPO / "README.md")
    where = [b.where for b in blocks]
    assert where[0] == "names"
    assert where.count("vehicle") >= 2 and where.count("fleet") >= 3
    assert where.count("fleet-background") == 2  # the broker and the fleet node
    vehicle = "\n".join(b.script for b in blocks if b.where == "vehicle")
    for step in ("apt-get install -y ./edge-agent_", "edge-agent doctor",
                 "systemctl enable --now edge-agent", "/etc/edge-agent/credentials/"):  # fmt: skip
        assert step in vehicle
    fleet = "\n".join(b.script for b in blocks if b.where.startswith("fleet"))
    for step in ("edge-fleet provision", "edge-fleet broker --tls", "edge-fleet register",
                 "edge-fleet serve", "edge-fleet jobs"):  # fmt: skip
        assert step in fleet


def test_packaging_scripts_are_valid_shell():
    subprocess.run(["/bin/bash", "-n", str(DEBIAN / "build-deb")], check=True)
    for script in ("postinst", "prerm", "postrm"):
        subprocess.run(["/bin/sh", "-n", str(DEBIAN / script)], check=True)
        assert (DEBIAN / script).stat().st_mode & 0o111, f"{script} must be executable"


def test_the_unit_names_what_the_package_installs():
    unit = (REPO / "systemd" / "edge-agent.service").read_text()
    build = (DEBIAN / "build-deb").read_text()
    assert "ExecStart=/usr/bin/edge-agent run" in unit
    assert 'ln -s /opt/edge-agent/bin/edge-agent "$root/usr/bin/edge-agent"' in build
    assert "LoadCredential=vehicle.key:/etc/edge-agent/credentials/vehicle.key" in unit
    assert "/etc/edge-agent/credentials" in build
    assert "example.invalid" not in unit, "Documentation= points at the installed docs"
    assert "procps" in build, "ExecReload's /bin/kill comes from procps"
