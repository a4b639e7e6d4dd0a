"""MQTT connection settings that both sides use.

TCP_NODELAY: MQTT's small packets (PUBACK, a status, an event) otherwise wait
behind Nagle's algorithm for the peer's delayed ACK: about 40 ms per QoS 1
publish on loopback, measured with bench/overhead.py. paho-mqtt does not set
it, so every client here passes these socket options.
"""

from __future__ import annotations

import socket

NO_DELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
