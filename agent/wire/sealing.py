"""HPKE sealing of results (RFC 9180 base mode: X25519, HKDF-SHA256, ChaCha20-Poly1305).

HPKE in `cryptography` takes no associated data, so the context is bound
through `info`: the protocol version, the job id and attempt, the vehicle id
and the digest of the signed job. A ciphertext moved to another job or
vehicle fails to open. Base mode does not authenticate the sender, which is
why the sealed result is also signed by the vehicle (see envelope.py).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from agent.wire.errors import Reason, WireError

_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
_LABEL = b"edge-fleet result v1"


def result_info(job_id: str, attempt: int, vehicle_id: str, job_digest: str) -> bytes:
    """Length-prefixed binding of the result to one signed job on one vehicle."""
    parts = [
        _LABEL,
        job_id.encode(),
        str(attempt).encode(),
        vehicle_id.encode(),
        job_digest.encode(),
    ]
    return b"".join(b"%d:%b;" % (len(p), p) for p in parts)


def seal(plaintext: bytes, requester: X25519PublicKey, info: bytes) -> bytes:
    return _SUITE.encrypt(plaintext, requester, info=info)


def open_sealed(ciphertext: bytes, requester: X25519PrivateKey, info: bytes) -> bytes:
    """Decrypt, or raise WireError(BAD_CIPHERTEXT) if it was altered or bound to other context."""
    try:
        return _SUITE.decrypt(ciphertext, requester, info=info)
    except (InvalidTag, ValueError) as exc:
        raise WireError(
            Reason.BAD_CIPHERTEXT,
            f"sealed result does not open for this job, vehicle and key ({type(exc).__name__})",
        ) from None
