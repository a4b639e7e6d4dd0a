"""The layout is a contract: the import-linter contracts in pyproject.toml hold (layers, a
core and a wire free of I/O, the two sides meeting only through the wire and the shared
kit, no cycles), and no module grows past the size where one reader can hold it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 500


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    return str(exe) if exe.exists() else shutil.which("lint-imports") or "lint-imports"


def test_the_import_contracts_hold():
    run = subprocess.run(
        [_lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "5 kept, 0 broken" in run.stdout


def test_a_broken_contract_is_caught(tmp_path):
    """The checker can fail: a copy of the tree whose core imports asyncio breaks it."""
    for name in ("agent", "broker"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    gate = tmp_path / "agent" / "core" / "gate.py"
    gate.write_text(gate.read_text() + "\nimport asyncio  # a core that does I/O\n")
    run = subprocess.run(
        [_lint_imports(), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode != 0
    assert "agent.core.gate -> asyncio" in run.stdout


@pytest.mark.parametrize("package", ["agent", "broker"])
def test_no_module_is_over_500_lines(package):
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / package).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"split these: {long}"
