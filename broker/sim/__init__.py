"""`edge-fleet simulate`: N virtual vehicles on the real wire, for load tests.

Each car is its own MQTT 5 connection with its own client id (and, with --pki, its own
certificate from `edge-fleet provision --vehicle`), a Last Will, and the protocol code of
agent/wire: work requests, job signature checks, work hints, HPKE-sealed results signed
with the car's key. What is simulated: the compute (a sleep of --compute-ms) and the car
(each follows a shipped scenario through the emulated vehicle and the real gate, time
compressed, from a random point in its day). It is not the agent: 1,000 agent processes
do not fit on one machine; this is the wire they speak.

The one fleet package that plays cars: the import contract lets it (and only it) use the
emulated vehicle and the gate (pyproject.toml, contract "peers").

Keys come from --seed: the same seed gives the same cars, so `--registry-only` can write the
registry for `edge-fleet serve` before the cars start. Test keys, never a real car's.
"""
