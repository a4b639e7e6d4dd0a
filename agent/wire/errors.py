"""The reasons a message from the wire is refused, and the error that carries one.

Every refusal, on either side of the wire, ends in a `WireError` whose
`reason` is one of `Reason`'s stable codes (they appear in rejected events and
in logs, so fleets can count them) and whose `detail` says what was wrong.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Stable codes for why a message was refused or a job did not run."""

    OVERSIZED = "oversized"
    MALFORMED_ENVELOPE = "malformed_envelope"
    UNSIGNED = "unsigned"
    WRONG_PAYLOAD_TYPE = "wrong_payload_type"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    MALFORMED_PAYLOAD = "malformed_payload"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_VEHICLE = "wrong_vehicle"
    REPLAYED = "replayed"
    MODEL_UNAVAILABLE = "model_unavailable"
    MODEL_MISMATCH = "model_mismatch"
    BAD_INPUTS = "bad_inputs"
    ISSUER_NOT_ACCEPTED = "issuer_not_accepted"
    CLASS_NOT_ACCEPTED = "class_not_accepted"
    BAD_CIPHERTEXT = "bad_ciphertext"
    UNKNOWN_JOB = "unknown_job"
    # The trust policy: a delegated key signing outside its scope, a requester it does not name,
    # or no valid policy at all (expired: fail closed until a fresh one arrives).
    KEY_OUT_OF_SCOPE = "key_out_of_scope"
    REQUESTER_NOT_ALLOWED = "requester_not_allowed"
    # A requester key no result can be sealed to (a low-order X25519 point).
    BAD_REQUESTER_KEY = "bad_requester_key"
    POLICY_EXPIRED = "trust_policy_expired"
    # Not refusals of the message itself: the vehicle hands the job back.
    GATE_CLOSED = "gate_closed"
    BUSY = "busy"
    # Failures while running an accepted job.
    DEADLINE = "deadline_exceeded"
    RUNTIME_ERROR = "runtime_error"
    WORKER_CRASHED = "worker_crashed"
    MEMORY_LIMIT = "memory_limit"
    # Not the job's fault, so handed back without a strike: the worker was killed from outside
    # (SIGKILL we did not send: the OOM killer, an operator), or could not be started.
    WORKER_KILLED = "worker_killed"
    WORKER_UNAVAILABLE = "worker_unavailable"
    # The agent itself failed while handling this job (a fault of ours, not of the job):
    # the job fails with this reason and the daemon serves the next one.
    AGENT_ERROR = "agent_error"
    # Refused because this job crashed the worker before: not retried here again.
    POISON_JOB = "poison_job"


class WireError(Exception):
    """Raised when a message from the wire is refused; `reason` says why, for machines."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
