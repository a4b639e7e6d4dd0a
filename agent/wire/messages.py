"""The message schemas of protocol v1. Every field is checked; unknown fields are refused.

Signed payloads: `JobSpec` (fleet -> vehicle, inside a job envelope) and
`SealedResult` (vehicle -> requester, inside a result envelope, with the
plaintext `ResultBody` encrypted in it). Plain messages: `WorkRequest`,
`JobEvent`, `VehicleStatus`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, Literal

from pydantic import Field, model_validator

from agent.wire.codec import B64Bytes, WireModel, exactly
from agent.wire.tensors import Tensor
from agent.wire.topics import VEHICLE_ID_PATTERN

VehicleId = str
VEHICLE_ID_RE = exactly(VEHICLE_ID_PATTERN)
JOB_ID_RE = exactly(r"[A-Za-z0-9_-]{1,64}")
SHA256_RE = exactly(r"[0-9a-f]{64}")
NAME_RE = exactly(r"[A-Za-z0-9_.-]{1,64}")
KEY_ID_RE = exactly(r"[0-9a-f]{16}")

MAX_JOB_LIFETIME_S = 7 * 24 * 3600.0
MAX_INPUTS = 16
MAX_MODEL_BYTES = 256 * 1024 * 1024


class ModelRef(WireModel):
    """A model pinned by name, sha256 and exact byte length."""

    name: str = Field(pattern=NAME_RE)
    sha256: str = Field(pattern=SHA256_RE)
    size: int = Field(gt=0, le=MAX_MODEL_BYTES)


class Limits(WireModel):
    max_runtime_s: float = Field(gt=0, le=3600, allow_inf_nan=False)


class JobFields(WireModel):
    """Everything a job says except its inputs (shared by JobSpec and the job bundle's header)."""

    job_id: str = Field(pattern=JOB_ID_RE)
    attempt: int = Field(ge=1, le=1000)
    issuer: str = Field(pattern=KEY_ID_RE)
    issued_at: float = Field(ge=0, allow_inf_nan=False)
    expires_at: float = Field(ge=0, allow_inf_nan=False)
    vehicle_id: str = Field(pattern=VEHICLE_ID_RE)
    job_class: str = Field(pattern=NAME_RE)
    model: ModelRef
    limits: Limits
    requester_key: B64Bytes = Field(min_length=32, max_length=32)

    @model_validator(mode="after")
    def _lifetime(self) -> JobFields:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        if self.expires_at - self.issued_at > MAX_JOB_LIFETIME_S:
            raise ValueError(f"job lifetime exceeds {MAX_JOB_LIFETIME_S:.0f} s")
        return self


class JobSpec(JobFields):
    """One inference job, bound to one vehicle and signed by a fleet job-signing key."""

    inputs: dict[str, Tensor] = Field(min_length=1, max_length=MAX_INPUTS)

    @model_validator(mode="after")
    def _input_names(self) -> JobSpec:
        for name in self.inputs:
            if not 1 <= len(name) <= 128:
                raise ValueError("input names must be 1-128 characters")
        return self


class ModelHeld(WireModel):
    name: str = Field(pattern=NAME_RE)
    sha256: str = Field(pattern=SHA256_RE)


class WorkRequest(WireModel):
    """Sent by an eligible vehicle: 'I can take `capacity` more jobs for these models'."""

    vehicle_id: str = Field(pattern=VEHICLE_ID_RE)
    request_id: int = Field(ge=0)
    capacity: int = Field(ge=1, le=64)
    models: tuple[ModelHeld, ...] = Field(max_length=256)
    sent_at: float = Field(ge=0, allow_inf_nan=False)


class EventKind(StrEnum):
    ACCEPTED = "accepted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    PREEMPTED = "preempted"
    RELEASED = "released"
    # Sent every agent.heartbeat_s for each job the vehicle holds: the dispatcher extends
    # the job's lease, so a long job is not handed to another vehicle while it runs.
    HEARTBEAT = "heartbeat"


# The lean per-job path (docs/protocol.md): a job that goes well costs three messages, the
# job, its result and the next work request. Its informational events stay on the car (log,
# journal, counts) and are published only with `job_events = "all"`: `accepted` and
# `running` tell the fleet nothing it acts on (only heartbeats extend a lease), and a result
# is itself the terminal message of a job that succeeded. Every event that hands a job back
# or ends it otherwise (failed, rejected, preempted, released) and every heartbeat is
# always published.
FOLDED_EVENTS = frozenset({EventKind.ACCEPTED, EventKind.RUNNING, EventKind.SUCCEEDED})


class JobEvent(WireModel):
    """A step in a job's life on a vehicle. `job_id` is None when the job could not be read."""

    vehicle_id: str = Field(pattern=VEHICLE_ID_RE)
    job_id: str | None = Field(default=None, pattern=JOB_ID_RE)
    attempt: int | None = Field(default=None, ge=1, le=1000)
    kind: EventKind
    reason: str | None = Field(default=None, max_length=64)
    detail: str = Field(default="", max_length=500)
    at: float = Field(ge=0, allow_inf_nan=False)


class VehicleStatus(WireModel):
    """Retained on the status topic; the Last Will publishes `online: false`."""

    vehicle_id: str = Field(pattern=VEHICLE_ID_RE)
    online: bool
    gate_open: bool
    reasons: tuple[str, ...] = Field(default=(), max_length=32)
    agent_version: str = Field(default="", max_length=32)
    at: float = Field(ge=0, allow_inf_nan=False)
    # The trust policy the vehicle holds (None: a fixed key list), so the fleet sees a rollout.
    policy_version: int | None = Field(default=None, ge=1)


SUITE: Final = "X25519-HKDF-SHA256-ChaCha20Poly1305"


class SealedResult(WireModel):
    """A result encrypted to the requester; signed by the vehicle inside a result envelope."""

    job_id: str = Field(pattern=JOB_ID_RE)
    attempt: int = Field(ge=1, le=1000)
    vehicle_id: str = Field(pattern=VEHICLE_ID_RE)
    job_digest: str = Field(pattern=SHA256_RE)
    suite: Literal["X25519-HKDF-SHA256-ChaCha20Poly1305"]
    ciphertext: B64Bytes = Field(max_length=128 * 1024 * 1024)


class ResultBody(WireModel):
    """The plaintext inside a SealedResult: only the requester reads it."""

    job_id: str = Field(pattern=JOB_ID_RE)
    attempt: int = Field(ge=1, le=1000)
    vehicle_id: str = Field(pattern=VEHICLE_ID_RE)
    model_sha256: str = Field(pattern=SHA256_RE)
    outputs: dict[str, Tensor] = Field(max_length=MAX_INPUTS)
    runtime_ms: float = Field(ge=0, allow_inf_nan=False)
    finished_at: float = Field(ge=0, allow_inf_nan=False)
    energy_wh: float | None = Field(default=None, ge=0, allow_inf_nan=False)
