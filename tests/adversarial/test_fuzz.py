"""Fuzzing the way in: the job intake chain the agent runs on every message (envelope, strict
schema, trust policy, admission), the trust policy parser and the result bundle decoder, with
thousands of generated inputs. Whatever arrives, the answer is a WireError with a reason and a
detail; never another exception, and never an accepted job that was not the honest one."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core.intake import IntakeContext, Outcome
from agent.core.intake import intake as core_intake
from agent.core.trust import Trust
from agent.inference.store import ModelStore
from agent.wire import envelope
from agent.wire.bundle import (
    MAGIC,
    decode_result_body,
    sign_job_bundle,
    verify_result,
)
from agent.wire.codec import dump_model
from agent.wire.errors import Reason, WireError
from agent.wire.keys import KeyRing
from agent.wire.messages import JobSpec
from agent.wire.policy import accept_policy, load_root_policy
from tests.support import MODELS, FleetKeys, job_spec

FLEET = FleetKeys()
VID = "veh-fuzz"
NOW = time.time()
TRUST, _ = Trust.from_policy(FLEET.policy(), None, NOW)
HELD = ModelStore.open(MODELS).held
HONEST = json.loads(dump_model(job_spec(FLEET, VID, issued_at=NOW)))
SETTINGS = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def context() -> IntakeContext:
    """An open gate, a free slot, every model held: nothing but the message decides."""
    return IntakeContext(
        vehicle_id=VID,
        local_now=NOW,
        clock_floor=0.0,
        trust=TRUST,
        max_message_bytes=1 << 20,
        max_clock_skew_s=60.0,
        max_input_bytes=1 << 20,
        seen={},
        models=HELD,
        crashes={},
        gate_open=True,
        stopping=False,
        has_slot=True,
    )


def intake(raw: bytes) -> JobSpec:
    """The agent's own intake (agent.core.intake.intake, which the daemon calls on every job
    message): the accepted job, or the typed refusal raised as a WireError."""
    verdict = core_intake(raw, context())
    assert verdict.error is None, f"the intake itself failed: {verdict.error!r}"
    if verdict.outcome is not Outcome.ACCEPT:
        assert verdict.outcome is Outcome.REJECT, "an open gate with a free slot hands nothing back"
        assert verdict.reason is not None
        raise WireError(Reason(verdict.reason), verdict.detail)
    assert verdict.job is not None and verdict.model is not None and verdict.admitted
    return verdict.job


def _refused(raw: bytes) -> WireError | None:
    try:
        intake(raw)
    except WireError as err:
        error = err
    else:
        return None
    assert error.detail, "every refusal says what was wrong"
    return error


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def test_the_honest_job_passes_the_intake():
    """The baseline the fuzzers mutate is itself accepted (so a refusal below means something)."""
    assert intake(envelope.sign(envelope.JOB_TYPE, json.dumps(HONEST).encode(), FLEET.job_key))


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused_with_a_typed_error(raw):
    assert _refused(raw) is not None


@SETTINGS
@given(
    st.sampled_from(sorted(HONEST)),
    st.sampled_from(["drop", "replace", "add"]),
    json_values,
)
def test_signed_mutations_of_a_real_job_are_refused_or_identical(field, action, value):
    """Validly signed payloads with one field dropped, replaced by any JSON value, or an extra
    field added: refused with a typed error, or (another attempt number, another valid input
    value) accepted as exactly the job that was signed, for this vehicle, unexpired."""
    body: dict[str, Any] = dict(HONEST)
    if action == "drop":
        del body[field]
    elif action == "replace":
        body[field] = value
    else:
        body[f"x_{field}"] = value
    raw = envelope.sign(envelope.JOB_TYPE, json.dumps(body).encode(), FLEET.job_key)
    err = _refused(raw)
    if err is None:
        job = intake(raw)
        assert json.loads(dump_model(job)) == body
        assert job.vehicle_id == VID and job.expires_at > NOW >= job.issued_at - 60


@SETTINGS
@given(json_values)
def test_any_signed_json_payload_is_refused(payload):
    raw = envelope.sign(envelope.JOB_TYPE, json.dumps(payload).encode(), FLEET.job_key)
    assert _refused(raw) is not None


@SETTINGS
@given(st.integers(min_value=0), st.integers(min_value=1, max_value=255))
def test_any_byte_change_of_a_signed_job_is_refused(position, xor):
    """Change any one byte of a signed honest job: refused, or (JSON whitespace, base64 padding)
    it decodes to the same signed job."""
    raw = bytearray(envelope.sign(envelope.JOB_TYPE, json.dumps(HONEST).encode(), FLEET.job_key))
    raw[position % len(raw)] ^= xor
    if _refused(bytes(raw)) is None:
        assert json.loads(dump_model(intake(bytes(raw)))) == HONEST


HONEST_BUNDLE, _ = sign_job_bundle(job_spec(FLEET, VID, issued_at=NOW), FLEET.job_key)


def test_the_honest_job_bundle_passes_the_intake():
    assert json.loads(dump_model(intake(HONEST_BUNDLE))) == HONEST


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bundles_are_refused_with_a_typed_error(rest):
    assert _refused(MAGIC + rest) is not None


@SETTINGS
@given(st.integers(min_value=0), st.integers(min_value=1, max_value=255))
def test_any_byte_change_of_a_signed_job_bundle_is_refused(position, xor):
    """Change any one byte of a signed job bundle: refused, or (JSON whitespace, base64 padding
    inside the signed header) it decodes to the same signed job."""
    raw = bytearray(HONEST_BUNDLE)
    raw[position % len(raw)] ^= xor
    if _refused(bytes(raw)) is None:
        assert json.loads(dump_model(intake(bytes(raw)))) == HONEST


@SETTINGS
@given(st.binary(max_size=2048) | json_values.map(lambda v: json.dumps(v).encode()))
def test_policy_parser_refuses_garbage_with_a_typed_error(raw):
    held = load_root_policy(FLEET.policy())
    with pytest.raises(WireError):
        accept_policy(raw, held, NOW)
    with pytest.raises(WireError):
        load_root_policy(raw)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=1024))
def test_result_bundle_decoders_refuse_garbage_with_a_typed_error(raw):
    for data in (raw, b"EFB1" + raw):
        with pytest.raises(WireError):
            decode_result_body(data)
        with pytest.raises(WireError):
            verify_result(data, trusted=KeyRing.of(FLEET.job_key.public_key()), max_bytes=1 << 20)
