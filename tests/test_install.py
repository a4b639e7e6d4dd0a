"""The package as a user installs it: a wheel in a fresh virtualenv, run from elsewhere.

The wheel is built from this checkout and installed with pip into a new venv whose
only other import path is the test venv's site-packages (for the dependencies, so
nothing is downloaded). The demo then runs with the installed `edge-fleet` from an
empty folder: the models, scenarios and mosquitto configs must come from the wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-w", str(out), str(REPO)],
        check=True, timeout=120,
    )  # fmt: skip
    (built,) = out.glob("vehicle_edge_agent-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    # The dependencies from the test venv; its editable finder (.pth) is not processed here.
    (site / "zz-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index",
         "--disable-pip-version-check", str(wheel)],
        check=True, timeout=120,
    )  # fmt: skip
    return venv


def test_the_wheel_carries_the_models_and_only_our_two_packages(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"agent", "broker"}
    for shipped in ("manifest.json", "digits.onnx", "burn.onnx", "digits_holdout.npz"):
        assert f"broker/shipped_models/{shipped}" in names
    assert "agent/vehicle/scenarios/parked-charging.toml" in names
    metadata = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        .decode()
    )
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    runtime = [r for r in requires if "extra ==" not in r]
    assert not any("psutil" in r for r in runtime), "psutil is a bench/test dependency only"


def test_the_demo_runs_from_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run(
        [str(installed / "bin" / "python"), "-c",
         "import agent, broker.shipped as s; print(agent.__file__); print(s.MODELS)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    agent_file, models = where.stdout.split()
    assert agent_file.startswith(str(installed)), "the installed package, not the checkout"
    assert not Path(models).is_symlink() and (Path(models) / "manifest.json").is_file()

    version = subprocess.run(
        [str(installed / "bin" / "edge-agent"), "--version"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert version.returncode == 0 and "0." in version.stdout

    demo = subprocess.run(
        [str(installed / "bin" / "edge-fleet"), "demo", "--jobs", "20"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    report = json.loads((tmp_path / "demo-report.json").read_text())
    assert report["ok"] and report["results_verified_and_decrypted"] == 20, report
