"""The wire contract, v1: written once here, imported by the vehicle and the fleet.

Everything that crosses the broker is defined in this package: the topic tree
(`topics`), the strict JSON rules (`codec`), binary tensors (`tensors`), the
signed envelope (`envelope`), the message schemas (`messages`), HPKE sealing
of results (`sealing`) and the key file formats (`keys`). docs/protocol.md
describes the same thing in prose.
"""

PROTOCOL_VERSION = 1
