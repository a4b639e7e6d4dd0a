"""Key files on disk, for both sides: read and parsed by agent.wire.keys, written 0600.

The wire stays free of I/O; this is the edge that touches the files.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.wire.keys import (
    KeyFileError,
    KeyRing,
    private_pem,
    requester_key_from_pem,
    signing_key_from_pem,
)

__all__ = [
    "KeyFileError",
    "load_key_ring",
    "load_requester_key",
    "load_signing_key",
    "write_private_key",
]


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from None


def write_private_key(path: Path, key: Ed25519PrivateKey | X25519PrivateKey) -> None:
    """Write `key` as PEM PKCS#8, readable by the owner only; refuses to overwrite."""
    pem = private_pem(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    return signing_key_from_pem(_read(path, "key file"), str(path))


def load_requester_key(path: Path) -> X25519PrivateKey:
    return requester_key_from_pem(_read(path, "key file"), str(path))


def load_key_ring(path: Path) -> KeyRing:
    """Read a trusted-keys file; KeyFileError on anything wrong with it."""
    return KeyRing.from_file(_read(path, "trusted keys"), str(path))
