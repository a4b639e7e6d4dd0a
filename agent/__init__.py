"""vehicle-edge-agent: lends a parked, charging car's computer to the fleet, safely."""

__version__ = "0.1.0"

# The date this build was made (UTC midnight). It is the clock floor of last resort: a car
# whose clock was set back, starting with a fresh state directory, still never believes an
# earlier date than this (agent.core.clock). Raise it with every release.
BUILT_ON = "2026-12-03"
