"""The collector: verifies, decrypts and deduplicates results for a requester.

A result is accepted only if (in this order) it is a result envelope signed
by the key registered for the vehicle whose topic it came on, its sealed
header names that same vehicle, it answers a job this fleet actually sent
to that vehicle (by the digest of the signed job), and it opens with the
requester's key under the info that binds all of these. The first verified
result per job id wins; later ones are counted as duplicates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.wire.bundle import decode_result_body, verify_result
from agent.wire.errors import Reason, WireError
from agent.wire.keys import KeyRing
from agent.wire.messages import ResultBody
from agent.wire.sealing import open_sealed, result_info

MAX_RESULT_BYTES = 16 * 1024 * 1024

DigestLookup = Callable[[str, int, str], str | None]


@dataclass(frozen=True, slots=True)
class Collected:
    body: ResultBody
    vehicle_id: str
    duplicate: bool


class Collector:
    def __init__(
        self,
        *,
        vehicles: dict[str, Ed25519PublicKey],
        requester_key: X25519PrivateKey,
        digest_for: DigestLookup,
    ) -> None:
        self._vehicles = {vid: KeyRing.of(key) for vid, key in vehicles.items()}
        self._requester = requester_key
        self._digest_for = digest_for
        self.results: dict[str, Collected] = {}
        self.duplicates = 0
        self.rejected: dict[str, int] = {}

    def accept(self, vehicle_id: str, raw: bytes) -> Collected:
        """Verify and open one result from `vehicle_id`'s results topic, or raise WireError."""
        try:
            return self._accept(vehicle_id, raw)
        except WireError as err:
            self.rejected[err.reason.value] = self.rejected.get(err.reason.value, 0) + 1
            raise

    def _accept(self, vehicle_id: str, raw: bytes) -> Collected:
        ring = self._vehicles.get(vehicle_id)
        if ring is None:
            raise WireError(Reason.UNKNOWN_KEY, f"no registered key for vehicle {vehicle_id}")
        sealed, _ = verify_result(raw, trusted=ring, max_bytes=MAX_RESULT_BYTES)
        if sealed.vehicle_id != vehicle_id:
            raise WireError(
                Reason.WRONG_VEHICLE, f"result names {sealed.vehicle_id}, came from {vehicle_id}"
            )
        digest = self._digest_for(sealed.job_id, sealed.attempt, vehicle_id)
        if digest is None or digest != sealed.job_digest:
            raise WireError(
                Reason.UNKNOWN_JOB,
                f"no job {sealed.job_id} attempt {sealed.attempt} was sent to {vehicle_id} "
                "with that digest",
            )
        info = result_info(sealed.job_id, sealed.attempt, vehicle_id, digest)
        plaintext = open_sealed(sealed.ciphertext, self._requester, info)
        body = decode_result_body(plaintext)
        if (body.job_id, body.attempt, body.vehicle_id) != (
            sealed.job_id,
            sealed.attempt,
            vehicle_id,
        ):
            raise WireError(Reason.UNKNOWN_JOB, "sealed body does not match its header")
        if body.job_id in self.results:
            self.duplicates += 1
            return Collected(body, vehicle_id, duplicate=True)
        collected = Collected(body, vehicle_id, duplicate=False)
        self.results[body.job_id] = collected
        return collected
