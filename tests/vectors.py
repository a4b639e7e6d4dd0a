"""Protocol test vectors: fixed keys, one job and one sealed result, byte for byte.

`python -m tests.vectors > docs/test-vectors.json` writes them (docs/protocol.md explains
each field); tests/test_vectors.py checks the file against the code. A fleet backend in
another language checks itself against the file: it must produce the job envelope's
exact bytes from the payload and key, compute the same digest and `info`, open the
ciphertext to the exact body bytes, and verify the vehicle's signature.

The HPKE ciphertext is random (a fresh ephemeral key each time), so it was made once
and is stored; everything else is deterministic (Ed25519 signatures, the JSON encoding).
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.wire import envelope
from agent.wire.bundle import encode_result_body, sign_result
from agent.wire.codec import dump_model
from agent.wire.keys import key_id, raw_public
from agent.wire.messages import SUITE, JobSpec, Limits, ModelRef, ResultBody, SealedResult
from agent.wire.sealing import result_info, seal
from agent.wire.tensors import Tensor

JOB_SEED = bytes(range(32))
VEHICLE_SEED = bytes(range(32, 64))
REQUESTER_SECRET = bytes(range(64, 96))
VEHICLE_ID = "veh-000001"
ISSUED_AT = 1796083200.0  # 2026-12-01T00:00:00Z


def keys() -> tuple[Ed25519PrivateKey, Ed25519PrivateKey, X25519PrivateKey]:
    return (
        Ed25519PrivateKey.from_private_bytes(JOB_SEED),
        Ed25519PrivateKey.from_private_bytes(VEHICLE_SEED),
        X25519PrivateKey.from_private_bytes(REQUESTER_SECRET),
    )


def job_spec() -> JobSpec:
    job_key, _, requester = keys()
    return JobSpec(
        job_id="vector-job-1",
        attempt=2,
        issuer=key_id(job_key.public_key()),
        issued_at=ISSUED_AT,
        expires_at=ISSUED_AT + 3600.0,
        vehicle_id=VEHICLE_ID,
        job_class="digits-eval",
        model=ModelRef(name="digits", sha256="ab" * 32, size=1234),
        inputs={"X": Tensor.from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4) / 4)},
        limits=Limits(max_runtime_s=10.0),
        requester_key=raw_public(requester.public_key()),
    )


def result_body() -> ResultBody:
    return ResultBody(
        job_id="vector-job-1",
        attempt=2,
        vehicle_id=VEHICLE_ID,
        model_sha256="ab" * 32,
        outputs={
            "label": Tensor.from_numpy(np.array([7], dtype=np.int64)),
            "probabilities": Tensor.from_numpy(np.linspace(0, 0.9, 10, dtype=np.float32)[None]),
        },
        runtime_ms=1.25,
        finished_at=ISSUED_AT + 2.5,
        energy_wh=0.000125,
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def make(ciphertext: bytes | None = None) -> dict[str, Any]:
    """The vectors; a new random ciphertext unless one is given."""
    job_key, vehicle_key, requester = keys()
    spec = job_spec()
    payload = dump_model(spec)
    job_message = envelope.sign(envelope.JOB_TYPE, payload, job_key)
    digest = envelope.digest_of(envelope.JOB_TYPE, payload)
    body = encode_result_body(result_body())
    info = result_info(spec.job_id, spec.attempt, VEHICLE_ID, digest)
    if ciphertext is None:
        ciphertext = seal(body, requester.public_key(), info)
    sealed = SealedResult(
        job_id=spec.job_id,
        attempt=spec.attempt,
        vehicle_id=VEHICLE_ID,
        job_digest=digest,
        suite=SUITE,
        ciphertext=ciphertext,
    )
    result_message = sign_result(sealed, vehicle_key)
    return {
        "about": "edge-fleet protocol v1 test vectors; see docs/protocol.md. Bytes are "
        "base64 (standard, padded); keys are raw 32-byte seeds or secrets.",
        "keys": {
            "job_signing_ed25519_seed": b64(JOB_SEED),
            "job_signing_public": b64(raw_public(job_key.public_key())),
            "job_signing_keyid": key_id(job_key.public_key()),
            "vehicle_ed25519_seed": b64(VEHICLE_SEED),
            "vehicle_public": b64(raw_public(vehicle_key.public_key())),
            "requester_x25519_secret": b64(REQUESTER_SECRET),
            "requester_public": b64(raw_public(requester.public_key())),
        },
        "job": {
            "payload": b64(payload),
            "pae": b64(envelope.pae(envelope.JOB_TYPE, payload)),
            "message": b64(job_message),
            "digest": digest,
        },
        "result": {
            "body": b64(body),
            "info": b64(info),
            "ciphertext": b64(ciphertext),
            "hpke_enc": b64(ciphertext[:32]),
            "message": b64(result_message),
        },
    }


if __name__ == "__main__":
    json.dump(make(), sys.stdout, indent=2)
    sys.stdout.write("\n")
