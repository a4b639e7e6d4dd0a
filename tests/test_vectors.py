"""docs/test-vectors.json against the code: what a fleet backend in another language checks
itself against must be what this code sends and accepts, byte for byte."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.wire import envelope
from agent.wire.bundle import decode_result_body, verify_result
from agent.wire.keys import KeyRing
from agent.wire.sealing import open_sealed, result_info
from tests import vectors

VECTORS = json.loads((Path(__file__).parents[1] / "docs" / "test-vectors.json").read_text())


def raw(section: str, name: str) -> bytes:
    return base64.b64decode(VECTORS[section][name], validate=True)


def test_the_job_envelope_is_the_exact_bytes_the_code_signs():
    """The job payload, its PAE, its signed envelope and its digest are reproduced exactly
    from the fixed key (Ed25519 is deterministic)."""
    again = vectors.make(ciphertext=raw("result", "ciphertext"))
    assert again["job"] == VECTORS["job"]
    assert again["keys"] == VECTORS["keys"]
    payload = raw("job", "payload")
    assert raw("job", "pae") == b"DSSEv1 %d %s %d %s" % (
        len(envelope.JOB_TYPE),
        envelope.JOB_TYPE.encode(),
        len(payload),
        payload,
    )


def test_the_sealed_result_opens_to_the_exact_body_and_verifies():
    """The stored result message verifies under the vehicle's key, its ciphertext is the
    32-byte HPKE enc followed by the AEAD ciphertext (ciphertext_bytes counts both), it
    opens under the documented info with the requester's secret to the exact body bytes,
    and re-signing the same header gives the same message."""
    trusted = KeyRing.of(vectors.keys()[1].public_key())
    sealed, _digest = verify_result(raw("result", "message"), trusted=trusted, max_bytes=1 << 20)
    assert sealed.job_digest == VECTORS["job"]["digest"]
    ciphertext = raw("result", "ciphertext")
    assert sealed.ciphertext == ciphertext
    body = raw("result", "body")
    assert len(ciphertext) == 32 + len(body) + 16
    assert ciphertext[:32] == raw("result", "hpke_enc")
    info = raw("result", "info")
    assert info == result_info(sealed.job_id, sealed.attempt, sealed.vehicle_id, sealed.job_digest)
    assert b"1:2;" in info, "lp(attempt) is the attempt in ASCII decimal"
    requester = X25519PrivateKey.from_private_bytes(raw("keys", "requester_x25519_secret"))
    assert open_sealed(ciphertext, requester, info) == body
    assert decode_result_body(body) == vectors.result_body()
    assert vectors.make(ciphertext=ciphertext)["result"] == VECTORS["result"]


def test_a_changed_byte_anywhere_in_the_vector_result_is_refused():
    """One flipped byte in the ciphertext, or in the info, and the result does not open."""
    from agent.wire.errors import WireError

    requester = X25519PrivateKey.from_private_bytes(raw("keys", "requester_x25519_secret"))
    ciphertext, info = bytearray(raw("result", "ciphertext")), raw("result", "info")
    ciphertext[40] ^= 1
    with pytest.raises(WireError):
        open_sealed(bytes(ciphertext), requester, info)
    with pytest.raises(WireError):
        open_sealed(raw("result", "ciphertext"), requester, info.replace(b"1:2;", b"1:3;"))
