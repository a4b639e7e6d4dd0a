"""Whether a verified, parsed job may be accepted by this vehicle: pure checks, in order.

The signature has already been verified (envelope.verify) and the payload
parsed strictly (JobSpec). What remains is about this vehicle and this
moment: the issuer, the binding, freshness, replay, the pinned model and the
shape of the inputs. Each failure is a WireError with its Reason.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass

from agent.wire.errors import Reason, WireError
from agent.wire.keys import x25519_agreeable
from agent.wire.messages import JobSpec
from agent.wire.tensors import ITEMSIZE


@dataclass(frozen=True, slots=True)
class InputSpec:
    """What a model accepts for one input: dtype and shape (None for a free dimension)."""

    dtype: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True, slots=True)
class HeldModel:
    """A model this vehicle holds, verified against its pinned digest."""

    name: str
    sha256: str
    size: int
    inputs: Mapping[str, InputSpec]


@dataclass(frozen=True, slots=True)
class AdmissionContext:
    vehicle_id: str
    now: float
    max_clock_skew_s: float
    max_input_bytes: int
    seen: Container[tuple[str, int]]
    models: Mapping[str, HeldModel]
    # The owner's choices; empty means every issuer the vehicle trusts / every class.
    accepted_issuers: frozenset[str] = frozenset()
    accepted_classes: frozenset[str] = frozenset()


def admit(job: JobSpec, signed_by: str, ctx: AdmissionContext) -> HeldModel:
    """Return the model to run `job` with, or raise WireError saying why it is refused."""
    if job.issuer != signed_by:
        raise WireError(
            Reason.BAD_SIGNATURE, f"job claims issuer {job.issuer} but was signed by {signed_by}"
        )
    if ctx.accepted_issuers and job.issuer not in ctx.accepted_issuers:
        raise WireError(
            Reason.ISSUER_NOT_ACCEPTED, f"the owner does not accept jobs from issuer {job.issuer}"
        )
    if ctx.accepted_classes and job.job_class not in ctx.accepted_classes:
        raise WireError(
            Reason.CLASS_NOT_ACCEPTED, f"the owner does not accept job class {job.job_class!r}"
        )
    if job.vehicle_id != ctx.vehicle_id:
        raise WireError(
            Reason.WRONG_VEHICLE, f"job is bound to {job.vehicle_id}, this is {ctx.vehicle_id}"
        )
    if ctx.now >= job.expires_at:
        raise WireError(Reason.EXPIRED, f"job expired {ctx.now - job.expires_at:.1f} s ago")
    if job.issued_at > ctx.now + ctx.max_clock_skew_s:
        raise WireError(
            Reason.NOT_YET_VALID,
            f"job issued {job.issued_at - ctx.now:.1f} s in the future "
            f"(allowed skew {ctx.max_clock_skew_s:.0f} s)",
        )
    if (job.job_id, job.attempt) in ctx.seen:
        raise WireError(Reason.REPLAYED, f"job {job.job_id} attempt {job.attempt} seen before")
    model = ctx.models.get(job.model.name)
    if model is None:
        raise WireError(Reason.MODEL_UNAVAILABLE, f"this vehicle holds no model {job.model.name!r}")
    if (model.sha256, model.size) != (job.model.sha256, job.model.size):
        raise WireError(
            Reason.MODEL_MISMATCH,
            f"job pins {job.model.name} as sha256 {job.model.sha256[:12]}.. size {job.model.size}; "
            f"held copy is {model.sha256[:12]}.. size {model.size}",
        )
    check_inputs(job, model, ctx.max_input_bytes)
    if not x25519_agreeable(job.requester_key):
        raise WireError(
            Reason.BAD_REQUESTER_KEY,
            "the requester key is a low-order X25519 point: no result could be sealed to it",
        )
    return model


def check_inputs(job: JobSpec, model: HeldModel, max_bytes: int) -> None:
    """Inputs must match the model's names, dtypes and shapes, within the size limit."""
    total = sum(t.nbytes for t in job.inputs.values())
    if total > max_bytes:
        raise WireError(Reason.BAD_INPUTS, f"inputs total {total} bytes, limit is {max_bytes}")
    if set(job.inputs) != set(model.inputs):
        raise WireError(
            Reason.BAD_INPUTS,
            f"inputs {sorted(job.inputs)} do not match the model's {sorted(model.inputs)}",
        )
    for name, tensor in job.inputs.items():
        spec = model.inputs[name]
        if tensor.dtype != spec.dtype or spec.dtype not in ITEMSIZE:
            raise WireError(
                Reason.BAD_INPUTS, f"input {name} is {tensor.dtype}, the model wants {spec.dtype}"
            )
        fits = len(tensor.shape) == len(spec.shape) and all(
            want is None or want == got for want, got in zip(spec.shape, tensor.shape, strict=True)
        )
        if not fits:
            raise WireError(
                Reason.BAD_INPUTS,
                f"input {name} has shape {list(tensor.shape)}, the model wants "
                f"{['?' if d is None else d for d in spec.shape]}",
            )
        if 0 in tensor.shape:
            raise WireError(
                Reason.BAD_INPUTS,
                f"input {name} has shape {list(tensor.shape)}: an empty tensor has nothing "
                "to compute",
            )
