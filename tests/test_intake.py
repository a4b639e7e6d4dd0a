"""Job intake as one pure function (agent.core.intake): bytes in, a verdict out. The same
function the daemon calls on every job message, here without a broker, a disk or a clock."""

from __future__ import annotations

import dataclasses
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.admission import HeldModel, InputSpec
from agent.core.intake import BUSY, GATE_CLOSED, MAX_WORKER_CRASHES, IntakeContext, Outcome, intake
from agent.core.trust import Trust
from agent.wire.bundle import sign_job_bundle
from agent.wire.errors import Reason
from agent.wire.keys import KeyRing, key_id
from tests.support import DIGITS_REF, FleetKeys, job_spec, signed

FLEET = FleetKeys()
NOW = time.time()
TRUST, _ = Trust.from_policy(FLEET.policy(), None, NOW)
HELD = HeldModel(
    "digits", DIGITS_REF.sha256, DIGITS_REF.size, {"X": InputSpec("float32", (None, 64))}
)
VID = "veh-1"


def ctx(**kw: object) -> IntakeContext:
    base = IntakeContext(
        vehicle_id=VID,
        local_now=NOW,
        clock_floor=NOW - 1000.0,
        trust=TRUST,
        max_message_bytes=1 << 20,
        max_clock_skew_s=60.0,
        max_input_bytes=1 << 20,
        seen=set(),
        models={"digits": HELD},
        crashes={},
        gate_open=True,
        stopping=False,
        has_slot=True,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def honest(**kw: object) -> bytes:
    return signed(job_spec(FLEET, VID, issued_at=NOW - 5.0, **kw), FLEET.job_key)


def test_an_honest_job_is_accepted_with_its_model_digest_and_raised_floor():
    verdict = intake(honest(), ctx())
    assert verdict.outcome is Outcome.ACCEPT
    assert verdict.job is not None and verdict.job.job_id == "job-1"
    assert verdict.model is HELD
    assert len(verdict.digest) == 64
    assert verdict.reason is None and verdict.error is None
    assert verdict.admitted
    assert verdict.clock_floor == NOW - 5.0, "the floor rises to the job's issue time"


def test_a_bundle_takes_the_same_path():
    spec = job_spec(FLEET, VID, issued_at=NOW - 5.0)
    bundle, digest = sign_job_bundle(spec, FLEET.job_key)
    verdict = intake(bundle, ctx())
    assert verdict.outcome is Outcome.ACCEPT
    assert verdict.job == spec
    assert verdict.digest == digest


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"gate_open": False}, GATE_CLOSED),
        ({"stopping": True}, GATE_CLOSED),
        ({"has_slot": False}, BUSY),
    ],
)
def test_an_admitted_job_is_handed_back_when_it_cannot_run_now(kw, reason):
    verdict = intake(honest(), ctx(**kw))
    assert verdict.outcome is Outcome.RELEASE
    assert verdict.reason == reason
    assert verdict.detail
    assert verdict.admitted, "recorded, so a replay is still caught"
    assert verdict.model is None


def test_a_job_that_killed_the_worker_twice_is_refused_as_poison():
    verdict = intake(honest(), ctx(crashes={"job-1": MAX_WORKER_CRASHES}))
    assert (verdict.outcome, verdict.reason) == (Outcome.REJECT, Reason.POISON_JOB.value)
    assert verdict.admitted
    once = intake(honest(), ctx(crashes={"job-1": MAX_WORKER_CRASHES - 1}))
    assert once.outcome is Outcome.ACCEPT, "one crash is not yet poison"
    other = intake(honest(), ctx(crashes={"job-2": MAX_WORKER_CRASHES}))
    assert other.outcome is Outcome.ACCEPT, "poison is per job"


def test_poison_is_decided_before_the_gate():
    verdict = intake(honest(), ctx(crashes={"job-1": 5}, gate_open=False))
    assert verdict.reason == Reason.POISON_JOB.value


def test_a_closed_gate_is_decided_before_a_full_queue():
    verdict = intake(honest(), ctx(gate_open=False, has_slot=False))
    assert verdict.reason == GATE_CLOSED


@pytest.mark.parametrize(
    ("raw", "kw", "reason"),
    [
        (b"", {}, Reason.MALFORMED_ENVELOPE),
        (b"\x00" * 40, {}, Reason.MALFORMED_ENVELOPE),
        (None, {"max_message_bytes": 100}, Reason.OVERSIZED),
        (None, {"seen": {("job-1", 1)}}, Reason.REPLAYED),
        (None, {"models": {}}, Reason.MODEL_UNAVAILABLE),
        (None, {"vehicle_id": "veh-2"}, Reason.WRONG_VEHICLE),
        (None, {"local_now": NOW + 3600, "clock_floor": 0.0}, Reason.EXPIRED),
        (None, {"clock_floor": NOW + 3600}, Reason.EXPIRED),  # a clock set back: the floor
        (None, {"accepted_issuers": frozenset({"someone-else"})}, Reason.ISSUER_NOT_ACCEPTED),
        (None, {"accepted_classes": frozenset({"other"})}, Reason.CLASS_NOT_ACCEPTED),
        (None, {"max_input_bytes": 8}, Reason.BAD_INPUTS),
    ],
)
def test_refusals_are_typed_and_leave_nothing_to_record(raw, kw, reason):
    verdict = intake(honest() if raw is None else raw, ctx(**kw))
    assert (verdict.outcome, verdict.reason) == (Outcome.REJECT, reason.value)
    assert verdict.detail
    assert not verdict.admitted, "refused before admission: not recorded"
    assert verdict.error is None


def test_the_owners_choices_admit_what_they_name():
    spec = job_spec(FLEET, VID, issued_at=NOW - 5.0)
    verdict = intake(
        honest(),
        ctx(
            accepted_issuers=frozenset({FLEET.issuer}),
            accepted_classes=frozenset({spec.job_class}),
        ),
    )
    assert verdict.outcome is Outcome.ACCEPT


def test_a_key_outside_the_trust_in_force_is_unknown():
    stranger = Ed25519PrivateKey.generate()
    verdict = intake(signed(job_spec(FLEET, VID, issued_at=NOW), stranger), ctx())
    assert verdict.reason == Reason.UNKNOWN_KEY.value


def test_a_job_its_key_is_not_delegated_for_is_refused_by_the_policy():
    """A flat key ring has no scope; a policy's delegation is checked (authorize)."""
    flat = Trust(ring=KeyRing.of(FLEET.job_key.public_key()))
    other = FleetKeys()
    policy_trust, _ = Trust.from_policy(other.policy(), None, NOW)
    spec = job_spec(FLEET, VID, issued_at=NOW - 5.0)
    assert intake(signed(spec, FLEET.job_key), ctx(trust=flat)).outcome is Outcome.ACCEPT
    refused = intake(signed(spec, FLEET.job_key), ctx(trust=policy_trust))
    assert refused.reason == Reason.UNKNOWN_KEY.value
    assert key_id(FLEET.job_key.public_key()) == FLEET.issuer


def test_a_fault_of_our_own_is_a_typed_refusal_carrying_the_exception():
    class Exploding(dict):  # a model table that fails when asked
        def get(self, *_a: object, **_k: object) -> None:
            raise RuntimeError("table bug")

    verdict = intake(honest(), ctx(models=Exploding()))
    assert (verdict.outcome, verdict.reason) == (Outcome.REJECT, Reason.AGENT_ERROR.value)
    assert "at admit" in verdict.detail and "table bug" in verdict.detail
    assert isinstance(verdict.error, RuntimeError)
    assert verdict.job is not None and not verdict.admitted


def test_a_fault_while_deciding_names_that_stage():
    class BadCrashes(dict):
        def get(self, *_a: object, **_k: object) -> int:
            raise KeyError("crash table bug")

    verdict = intake(honest(), ctx(crashes=BadCrashes()))
    assert verdict.reason == Reason.AGENT_ERROR.value
    assert "at accept" in verdict.detail


def test_a_fault_while_parsing_names_that_stage(monkeypatch):
    import agent.core.intake as module

    def broken(*_a: object, **_k: object) -> None:
        raise ValueError("parser bug")

    monkeypatch.setattr(module, "parse_model", broken)
    verdict = intake(honest(), ctx())
    assert verdict.reason == Reason.AGENT_ERROR.value
    assert "at parse" in verdict.detail and verdict.job is None


def test_the_trusted_now_is_the_later_of_clock_and_floor():
    assert ctx(local_now=10.0, clock_floor=20.0).now == 20.0
    assert ctx(local_now=30.0, clock_floor=20.0).now == 30.0


def test_the_words_of_intakes_own_decisions():
    """What the fleet and the log read for each hand-back and the poison refusal; a refused
    or handed-back job still names itself."""
    released = intake(honest(), ctx(gate_open=False))
    assert released.detail == "vehicle not eligible now"
    busy = intake(honest(), ctx(has_slot=False))
    assert busy.detail == "no free slot"
    poison = intake(honest(), ctx(crashes={"job-1": 2}))
    assert poison.detail == "this job killed the worker twice before; not run here again"
    for verdict in (released, busy, poison):
        assert verdict.job is not None and verdict.job.job_id == "job-1"
    replayed = intake(honest(), ctx(seen={("job-1", 1)}))
    assert replayed.job is not None and replayed.job.job_id == "job-1"


def test_a_signed_payload_that_is_not_a_job_is_a_malformed_job():
    from agent.wire import envelope

    raw = envelope.sign(envelope.JOB_TYPE, b'{"hello": 1}', FLEET.job_key)
    verdict = intake(raw, ctx())
    assert verdict.reason == Reason.MALFORMED_PAYLOAD.value
    assert verdict.detail.startswith("job ")


def test_a_fault_names_the_exceptions_type():
    class Exploding(dict):
        def get(self, *_a: object, **_k: object) -> None:
            raise RuntimeError("table bug")

    verdict = intake(honest(), ctx(models=Exploding()))
    assert verdict.detail == "the agent failed at admit: RuntimeError: table bug"
