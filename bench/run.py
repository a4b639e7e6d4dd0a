"""`make bench`: every benchmark in one run on this machine; JSON under bench/results/."""

from __future__ import annotations

import sys

from bench import idle, overhead, powercap, preemption


def main() -> int:
    quick = "--quick" in sys.argv
    overhead.main(quick=quick)
    preemption.main(closures=20 if quick else 60)
    powercap.main(rows=100_000 if quick else 250_000)
    idle.main(seconds=10.0 if quick else 60.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
