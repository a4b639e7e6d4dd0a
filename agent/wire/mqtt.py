"""MQTT connection settings that both sides use.

TCP_NODELAY: MQTT's small packets (PUBACK, a status, an event) otherwise wait
behind Nagle's algorithm for the peer's delayed ACK: about 40 ms per QoS 1
publish on loopback, measured with bench/overhead.py. paho-mqtt does not set
it, so every client here passes these socket options.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from pathlib import Path

NO_DELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


def client_tls(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """TLS 1.2+ with the fleet CA as the only trust anchor, the broker's name checked, and
    this client's certificate presented. Never a plaintext fallback: the caller connects with
    this context or not at all."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
