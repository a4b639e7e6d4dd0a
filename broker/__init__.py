"""The fleet's side of the wire: a local Mosquitto for tests and demos, and the fleet tools
(keys, job submission, the dispatcher that hands out jobs, the collector that verifies and
decrypts results)."""
