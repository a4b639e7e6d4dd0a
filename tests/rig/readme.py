"""The README's install section as a script: its shell blocks, in order, with where each runs.

Each block's first line says where it runs:
  `# on both machines`                       the names; prefixed to every other block
  `# on the fleet machine`                   the fleet side (outside the container)
  `# on the fleet machine, in its own terminal (it keeps running)`   the same, in the background
  `# on the vehicle, as root`                inside the car
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SECTION = "## Install on a vehicle or rig"
WHERE = {
    "# on both machines": "names",
    "# on the fleet machine": "fleet",
    "# on the fleet machine, in its own terminal (it keeps running)": "fleet-background",
    "# on the vehicle, as root": "vehicle",
}


@dataclass(frozen=True)
class Block:
    where: str  # names | fleet | fleet-background | vehicle
    script: str


def install_blocks(readme: Path) -> list[Block]:
    text = readme.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else len(text)]
    blocks = []
    for body in re.findall(r"^```sh\n(.*?)^```$", section, flags=re.S | re.M):
        first, _, rest = body.partition("\n")
        if first.strip() not in WHERE:
            raise ValueError(f"README install block without a known first line: {first!r}")
        blocks.append(Block(WHERE[first.strip()], rest))
    return blocks
