"""The job store's vocabulary, whatever the engine: jobs, their assignments to vehicles, and leases.

A job is queued until a vehicle asks for work; it is then leased to that
vehicle for `lease_s`. A lease ends when the result arrives (done), when the
vehicle hands the job back, is preempted or goes offline, or when the lease
expires: then the job is queued again. Mosquitto does not redeliver an
in-flight message to another subscriber, so this bookkeeping cannot be left to
the broker.

Two bounds end a job that will not finish, and they count different things:
  - failures: a lease that ended through the job or the car failing it (a failed or
    rejected attempt, a lease that ran out while the car stayed online). The job fails
    for good after `max_attempts` of them.
  - its expiry (`expires_at`, set at submit): the car coming first (a preemption, a
    hand-back by a closed gate or a busy or restarting agent, a car gone offline, a worker
    killed from outside) is normal, never a failure; such a job is queued again, as
    often as it takes, until it expires.
`attempts` numbers the leases (each signed job carries it; the vehicle's replay record
keys on it), so it rises with every lease whatever the outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pydantic import Field, model_validator

from agent.wire.codec import B64Bytes, WireModel
from agent.wire.keys import x25519_agreeable
from agent.wire.messages import NAME_RE, Limits, ModelRef
from agent.wire.tensors import Tensor

STATES = ("queued", "leased", "done", "failed")
# A parked car woken for queued work counts against those jobs this long (it is on its way
# to ask: an agent asks within milliseconds of the hint); one that never asked is forgotten
# after WOKEN_FORGET_S. The cover bounds the pickup tail when a woken car does not come (its
# gate closed, or it was busy): 5 s gave a p99 pickup of 4.59 s in `make scale`.
WOKEN_COVER_S = 2.0
WOKEN_FORGET_S = 60.0


class JobTemplate(WireModel):
    """A job as submitted, before it is bound to a vehicle and signed."""

    job_class: str = Field(pattern=NAME_RE)
    model: ModelRef
    inputs: dict[str, Tensor]
    limits: Limits
    requester_key: B64Bytes = Field(min_length=32, max_length=32)
    lifetime_s: float = Field(gt=0, le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _sealable(self) -> JobTemplate:
        if not x25519_agreeable(self.requester_key):
            raise ValueError("requester_key is a low-order X25519 point: no result can be sealed")
        return self


# Hand-backs that put the car first: never counted as a failure of the job.
CAR_FIRST_REASONS = frozenset(
    {
        "gate_closed",
        "busy",
        "shutdown",
        "agent_restarted",
        "vehicle_offline",
        "worker_killed",
        "worker_unavailable",
        "state_disk_unavailable",
    }
)
DEFAULT_EXPIRY_S = 24 * 3600.0  # how long a submitted job may wait for a car, by default


def counts_as_failure(kind: str, reason: str) -> bool:
    """Whether a lease ending with this event kind and reason is the job failing: preempted and
    released attempts, and the car-first reasons, are not."""
    if kind in ("preempted", "released"):
        return False
    return reason not in CAR_FIRST_REASONS


@dataclass(frozen=True, slots=True)
class Lease:
    job_id: str
    attempt: int
    template: JobTemplate
    expires_at: float  # the job's own expiry: no signed attempt may outlive it


@dataclass(frozen=True, slots=True)
class QueueSummary:
    """What `edge-fleet queue` shows: jobs by state and the lease that has run longest."""

    counts: dict[str, int]
    oldest_lease_at: float | None  # when the longest-running current lease was handed out
    parked_vehicles: int  # vehicles told "no work" and waiting to be woken


class Completion(Enum):
    """What recording a verified result did."""

    FIRST = "first"  # the job's first result: accepted, the job is done
    DUPLICATE = "duplicate"  # the job already had one: counted, not kept
    NOT_SENT = "not_sent"  # no such attempt with that digest went to that vehicle: refused
