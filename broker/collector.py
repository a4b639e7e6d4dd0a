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
from agent.wire.messages import ResultBody, SealedResult
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
        digest_for: DigestLookup | None = None,
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
            self.rejected_for(err)
            raise

    def _accept(self, vehicle_id: str, raw: bytes) -> Collected:
        if self._digest_for is None:
            raise TypeError("accept() needs the digest_for lookup; the fleet node uses open()")
        sealed = self.verify(vehicle_id, raw)
        body = self.open(sealed, self._digest_for(sealed.job_id, sealed.attempt, vehicle_id))
        return self.record(body, vehicle_id, duplicate=body.job_id in self.results)

    def verify(self, vehicle_id: str, raw: bytes) -> SealedResult:
        """The signed header of a result from `vehicle_id`'s results topic, or WireError."""
        ring = self._vehicles.get(vehicle_id)
        if ring is None:
            raise WireError(Reason.UNKNOWN_KEY, f"no registered key for vehicle {vehicle_id}")
        sealed, _ = verify_result(raw, trusted=ring, max_bytes=MAX_RESULT_BYTES)
        if sealed.vehicle_id != vehicle_id:
            raise WireError(
                Reason.WRONG_VEHICLE, f"result names {sealed.vehicle_id}, came from {vehicle_id}"
            )
        return sealed

    def open(self, sealed: SealedResult, digest: str | None) -> ResultBody:
        """Open a verified result, given the digest of the job sent as that attempt to that
        vehicle (None: none was); WireError if it answers no such job or does not open."""
        vehicle_id = sealed.vehicle_id
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
        return body

    def rejected_for(self, err: WireError) -> None:
        self.rejected[err.reason.value] = self.rejected.get(err.reason.value, 0) + 1

    def record(self, body: ResultBody, vehicle_id: str, *, duplicate: bool) -> Collected:
        """Keep an opened result; a `duplicate` (the job already had one) is only counted."""
        if duplicate:
            self.duplicates += 1
            return Collected(body, vehicle_id, duplicate=True)
        collected = Collected(body, vehicle_id, duplicate=False)
        self.results[body.job_id] = collected
        return collected
