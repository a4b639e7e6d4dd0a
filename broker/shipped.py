"""What the package ships beside the code, found where it is installed.

`shipped_models` is a link to the repository's top-level `models/` folder, so a
checkout and an installed wheel (where setuptools copied the files in as package
data) find the same models at the same place.
"""

from __future__ import annotations

from pathlib import Path

MODELS = Path(__file__).resolve().parent / "shipped_models"
SCENARIOS = Path(__file__).resolve().parents[1] / "agent" / "vehicle" / "scenarios"
