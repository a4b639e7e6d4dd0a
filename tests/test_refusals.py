"""The agent refuses bad jobs with a rejected event naming the reason, runs nothing, and keeps serving."""

from __future__ import annotations

import base64
import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.wire import envelope
from agent.wire.codec import dump_model
from agent.wire.messages import ModelRef
from tests.support import (
    DIGITS_REF,
    FleetKeys,
    job_spec,
    observing,
    running_agent,
    signed,
    wait_for,
    write_vehicle,
)

pytestmark = pytest.mark.broker
VID = "veh-refuse"


def _unsigned_bare_json(fleet: FleetKeys) -> bytes:
    return dump_model(job_spec(fleet, VID))


def _envelope_without_signature(fleet: FleetKeys) -> bytes:
    env = json.loads(signed(job_spec(fleet, VID), fleet.job_key))
    env["signatures"] = []
    return json.dumps(env).encode()


def _untrusted_key_claiming_trusted_id(fleet: FleetKeys) -> bytes:
    env = json.loads(signed(job_spec(fleet, VID), Ed25519PrivateKey.generate()))
    env["signatures"][0]["keyid"] = fleet.issuer  # a key id is only a hint
    return json.dumps(env).encode()


def _flipped_payload_byte(fleet: FleetKeys) -> bytes:
    env = json.loads(signed(job_spec(fleet, VID), fleet.job_key))
    payload = bytearray(base64.b64decode(env["payload"]))
    payload[len(payload) // 2] ^= 0x01
    env["payload"] = base64.b64encode(bytes(payload)).decode()
    return json.dumps(env).encode()


def _flipped_signature_byte(fleet: FleetKeys) -> bytes:
    env = json.loads(signed(job_spec(fleet, VID), fleet.job_key))
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[0] ^= 0x80
    env["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    return json.dumps(env).encode()


def _expired(fleet: FleetKeys) -> bytes:
    return signed(job_spec(fleet, VID, issued_at=time.time() - 120, lifetime_s=60), fleet.job_key)


def _issued_in_future(fleet: FleetKeys) -> bytes:
    return signed(job_spec(fleet, VID, issued_at=time.time() + 3600), fleet.job_key)


def _other_vehicle(fleet: FleetKeys) -> bytes:
    return signed(job_spec(fleet, "veh-someone-else"), fleet.job_key)


def _model_hash_mismatch(fleet: FleetKeys) -> bytes:
    wrong = ModelRef(name="digits", sha256="0" * 64, size=DIGITS_REF.size)
    return signed(job_spec(fleet, VID, model=wrong), fleet.job_key)


def _model_size_mismatch(fleet: FleetKeys) -> bytes:
    wrong = ModelRef(name="digits", sha256=DIGITS_REF.sha256, size=DIGITS_REF.size + 1)
    return signed(job_spec(fleet, VID, model=wrong), fleet.job_key)


def _result_type_offered_as_job(fleet: FleetKeys) -> bytes:
    return envelope.sign(envelope.RESULT_TYPE, dump_model(job_spec(fleet, VID)), fleet.job_key)


def _unknown_field(fleet: FleetKeys) -> bytes:
    payload = json.loads(dump_model(job_spec(fleet, VID)))
    payload["run_as_root"] = True
    return envelope.sign(envelope.JOB_TYPE, json.dumps(payload).encode(), fleet.job_key)


def _duplicate_key(fleet: FleetKeys) -> bytes:
    body = dump_model(job_spec(fleet, VID)).decode()
    body = body.replace('"job_id":"job-1"', '"job_id":"job-1","job_id":"job-2"', 1)
    return envelope.sign(envelope.JOB_TYPE, body.encode(), fleet.job_key)


def _wrong_input_shape(fleet: FleetKeys) -> bytes:
    import numpy as np

    return signed(job_spec(fleet, VID, x=np.zeros((1, 63), np.float32)), fleet.job_key)


def _not_json(fleet: FleetKeys) -> bytes:
    return b"\xff\xfe not even text"


def _oversized(fleet: FleetKeys) -> bytes:
    return b'{"payloadType":"' + b"A" * (1024 * 1024 + 10) + b'"}'


CASES = [
    (_unsigned_bare_json, "malformed_envelope"),
    (_envelope_without_signature, "unsigned"),
    (_untrusted_key_claiming_trusted_id, "bad_signature"),
    (_flipped_payload_byte, "bad_signature"),
    (_flipped_signature_byte, "bad_signature"),
    (_expired, "expired"),
    (_issued_in_future, "not_yet_valid"),
    (_other_vehicle, "wrong_vehicle"),
    (_model_hash_mismatch, "model_mismatch"),
    (_model_size_mismatch, "model_mismatch"),
    (_result_type_offered_as_job, "wrong_payload_type"),
    (_unknown_field, "malformed_payload"),
    (_duplicate_key, "malformed_payload"),
    (_wrong_input_shape, "bad_inputs"),
    (_not_json, "malformed_envelope"),
    (_oversized, "oversized"),
]


@pytest.mark.parametrize(("make", "reason"), CASES, ids=[c[0].__name__.strip("_") for c in CASES])
async def test_bad_job_is_rejected_and_agent_keeps_serving(
    mosquitto, fleet, tmp_path, make, reason
):
    """Each bad job yields one rejected event with its reason, no run, and the next honest job runs."""
    files = write_vehicle(tmp_path, VID, port=mosquitto.port, fleet=fleet)
    async with observing(mosquitto.port, VID) as obs, running_agent(files) as agent:
        await obs.send_job(make(fleet))
        await wait_for(lambda: any(e["kind"] == "rejected" for e in obs.events), what="rejected")
        rejected = [e for e in obs.events if e["kind"] == "rejected"]
        assert [e["reason"] for e in rejected] == [reason]
        assert rejected[0]["detail"], "a rejection says what was wrong"
        assert agent.counts["running"] == 0
        assert obs.results == []

        honest = signed(job_spec(fleet, VID, job_id="job-honest"), fleet.job_key)
        await obs.send_job(honest)
        await wait_for(lambda: "succeeded" in obs.kinds("job-honest"), what="honest job done")
        assert len(obs.results) == 1
        assert agent.counts["running"] == 1


async def test_replayed_job_runs_once(mosquitto, fleet, tmp_path):
    """The same signed job delivered twice runs once; the second copy is rejected as replayed."""
    files = write_vehicle(tmp_path, VID, port=mosquitto.port, fleet=fleet)
    raw = signed(job_spec(fleet, VID), fleet.job_key)
    async with observing(mosquitto.port, VID) as obs, running_agent(files) as agent:
        await obs.send_job(raw)
        await wait_for(lambda: "succeeded" in obs.kinds(), what="first run")
        await obs.send_job(raw)
        await wait_for(lambda: "rejected" in obs.kinds(), what="replay rejected")
        assert [e["reason"] for e in obs.events if e["kind"] == "rejected"] == ["replayed"]
        assert agent.counts["running"] == 1
        assert len(obs.results) == 1


@pytest.mark.parametrize("scenario", ["driving", "hot-parked"])
async def test_ineligible_vehicle_runs_a_pushed_job_never(mosquitto, fleet, tmp_path, scenario):
    """A driving or hot vehicle that is sent a valid job anyway hands it back and runs nothing."""
    files = write_vehicle(tmp_path, VID, port=mosquitto.port, fleet=fleet, scenario=scenario)
    async with observing(mosquitto.port, VID) as obs, running_agent(files) as agent:
        await obs.send_job(signed(job_spec(fleet, VID), fleet.job_key))
        await wait_for(lambda: "released" in obs.kinds(), what="job handed back")
        assert [e["reason"] for e in obs.events if e["kind"] == "released"] == ["gate_closed"]
        assert agent.counts["running"] == 0
        assert obs.results == []
        assert obs.work == [], "an ineligible vehicle never asks for work"


async def test_owner_not_opted_in_runs_nothing(mosquitto, fleet, tmp_path):
    """Without the owner's opt-in the gate stays closed, whatever the car's state."""
    files = write_vehicle(tmp_path, VID, port=mosquitto.port, fleet=fleet, opted_in=False)
    async with observing(mosquitto.port, VID) as obs, running_agent(files) as agent:
        await obs.send_job(signed(job_spec(fleet, VID), fleet.job_key))
        await wait_for(lambda: "released" in obs.kinds(), what="job handed back")
        assert agent.gate.last is not None
        assert "not_opted_in" in [r.value for r in agent.gate.last.reasons]
        assert agent.counts["running"] == 0
        assert obs.work == []
