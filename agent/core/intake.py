"""Job intake as one pure function: the bytes of a job message in, a verdict out.

In the style of h11, no I/O: the runtime hands it the message and what it knows at this
moment (an `IntakeContext`), and acts on the `Verdict`. The chain, in order:

  verify     the signature over the exact bytes (a plain envelope or a bundle), by a key
             the trust in force holds, within the size limit;
  parse      the payload, strictly (JobSpec);
  authorize  the trust policy lets that key sign this job now, and names its requester;
  admit      this vehicle, this moment: issuer, owner's choices, binding, freshness,
             replay, the pinned model, the inputs (agent.core.admission);
  floor      the trusted clock floor rises towards the job's issue time;
  decide     accept it, hand it back (gate closed, stopping, no free slot), or refuse it
             (it killed the worker twice before).

A job that got through admission is `admitted`: the runtime records it durably (the
replay record and the raised floor) before it acts on the verdict, so a replay after a
crash is still caught. A refusal before that leaves nothing behind. A fault of our own
(any exception other than WireError) is a typed refusal too, `agent_error`, carrying the
exception so the runtime can log it: one message never ends the daemon.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass
from enum import StrEnum

from agent.core.admission import AdmissionContext, HeldModel, admit
from agent.core.clock import raised_floor
from agent.core.trust import Trust
from agent.wire import envelope
from agent.wire.bundle import is_bundle, verify_job_bundle
from agent.wire.codec import parse_model
from agent.wire.errors import Reason, WireError
from agent.wire.messages import JobSpec

# Not a wire Reason: a hand-back because the gate is closed carries the wire reason
# gate_closed; these name the other hand-backs.
BUSY = Reason.BUSY.value
GATE_CLOSED = Reason.GATE_CLOSED.value
SHUTDOWN = "shutdown"
MAX_WORKER_CRASHES = 2  # a job that killed the worker this often is not run here again


class Outcome(StrEnum):
    ACCEPT = "accept"
    RELEASE = "release"  # handed back: not run here now, the fleet sends it elsewhere
    REJECT = "reject"  # refused: the job itself is wrong for this vehicle


@dataclass(frozen=True, slots=True)
class IntakeContext:
    """What the agent knows when a job message arrives."""

    vehicle_id: str
    local_now: float  # the system clock
    clock_floor: float  # the trusted floor held (agent.core.clock)
    trust: Trust
    max_message_bytes: int
    max_clock_skew_s: float
    max_input_bytes: int
    seen: Container[tuple[str, int]]  # (job id, attempt) admitted before
    models: Mapping[str, HeldModel]
    crashes: Mapping[str, int]  # job id -> how often it killed the worker
    gate_open: bool
    stopping: bool
    has_slot: bool
    # The owner's choices; empty means every issuer the vehicle trusts / every class.
    accepted_issuers: frozenset[str] = frozenset()
    accepted_classes: frozenset[str] = frozenset()

    @property
    def now(self) -> float:
        """The trusted now: the system clock, never below the floor."""
        return max(self.local_now, self.clock_floor)


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    job: JobSpec | None  # None when the message could not be read as a job
    reason: str | None = None
    detail: str = ""
    model: HeldModel | None = None  # set on accept
    digest: str = ""  # sha256 of what the fleet signed: binds the sealed result
    # Set once the job was admitted: the floor to record with it, durably, before acting.
    clock_floor: float | None = None
    error: Exception | None = None  # our own fault, for the log (reason agent_error)

    @property
    def admitted(self) -> bool:
        return self.clock_floor is not None


def intake(raw: bytes, ctx: IntakeContext) -> Verdict:
    """Verify, parse, authorize and admit one job message, then decide what to do with it."""
    job: JobSpec | None = None
    stage = "parse"
    try:
        trusted, limit = ctx.trust.ring, ctx.max_message_bytes
        if is_bundle(raw):  # a job with large inputs: signed header, then raw tensors
            verified, job = verify_job_bundle(raw, trusted=trusted, max_bytes=limit)
        else:
            verified = envelope.verify(
                raw, payload_type=envelope.JOB_TYPE, trusted=trusted, max_bytes=limit
            )
            job = parse_model(
                verified.payload, JobSpec, what="job", reason=Reason.MALFORMED_PAYLOAD
            )
        stage = "admit"
        ctx.trust.authorize(job, verified.keyid, ctx.now)
        model = admit(
            job,
            verified.keyid,
            AdmissionContext(
                vehicle_id=ctx.vehicle_id,
                now=ctx.now,
                max_clock_skew_s=ctx.max_clock_skew_s,
                max_input_bytes=ctx.max_input_bytes,
                seen=ctx.seen,
                models=ctx.models,
                accepted_issuers=ctx.accepted_issuers,
                accepted_classes=ctx.accepted_classes,
            ),
        )
        stage = "accept"
        floor = raised_floor(ctx.clock_floor, job.issued_at, ctx.local_now)
        return decide(job, model, verified.digest, floor, ctx)
    except WireError as err:
        return Verdict(Outcome.REJECT, job, err.reason.value, err.detail)
    except Exception as exc:  # a fault of ours: the job is refused, typed, and only it
        return Verdict(
            Outcome.REJECT,
            job,
            Reason.AGENT_ERROR.value,
            f"the agent failed at {stage}: {type(exc).__name__}: {exc}",
            error=exc,
        )


def decide(
    job: JobSpec, model: HeldModel, digest: str, floor: float, ctx: IntakeContext
) -> Verdict:
    """An admitted job: accept it, hand it back, or refuse it as poison."""
    if ctx.crashes.get(job.job_id, 0) >= MAX_WORKER_CRASHES:
        return Verdict(
            Outcome.REJECT,
            job,
            Reason.POISON_JOB.value,
            "this job killed the worker twice before; not run here again",
            clock_floor=floor,
        )
    if not ctx.gate_open or ctx.stopping:
        return Verdict(
            Outcome.RELEASE, job, GATE_CLOSED, "vehicle not eligible now", clock_floor=floor
        )
    if not ctx.has_slot:
        return Verdict(Outcome.RELEASE, job, BUSY, "no free slot", clock_floor=floor)
    return Verdict(Outcome.ACCEPT, job, model=model, digest=digest, clock_floor=floor)
