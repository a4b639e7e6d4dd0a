"""THREATS.md 1-7 and 11, each against the real agent and broker over mutual TLS: a bad job gets
one rejected event naming the reason and saying what was wrong, nothing runs, no result is
published, and the daemon serves the next honest job."""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.wire import envelope
from agent.wire.bundle import sign_job_bundle
from agent.wire.codec import dump_model
from agent.wire.messages import ModelRef
from agent.wire.tensors import Tensor
from tests.adversarial.conftest import VID, Rig
from tests.support import DIGITS_REF, FleetKeys, job_spec, running_agent, signed, wait_for

pytestmark = pytest.mark.broker


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


def _input_over_the_size_limit(fleet: FleetKeys) -> bytes:
    """64 rows of 64 float32: 16 KiB of input, over the 8 KiB the test vehicle allows."""
    return signed(job_spec(fleet, VID, x=np.zeros((64, 64), np.float32)), fleet.job_key)


def _wrong_input_dtype(fleet: FleetKeys) -> bytes:
    inputs = {"X": Tensor.from_numpy(np.zeros((1, 64), np.float64))}
    return signed(job_spec(fleet, VID, inputs=inputs), fleet.job_key)


def _missing_field(fleet: FleetKeys) -> bytes:
    payload = json.loads(dump_model(job_spec(fleet, VID)))
    del payload["expires_at"]
    return envelope.sign(envelope.JOB_TYPE, json.dumps(payload).encode(), fleet.job_key)


def _wrong_type(fleet: FleetKeys) -> bytes:
    payload = json.loads(dump_model(job_spec(fleet, VID)))
    payload["attempt"] = "1"
    return envelope.sign(envelope.JOB_TYPE, json.dumps(payload).encode(), fleet.job_key)


def _absurd_lifetime(fleet: FleetKeys) -> bytes:
    payload = json.loads(dump_model(job_spec(fleet, VID)))
    payload["expires_at"] = payload["issued_at"] + 10 * 365 * 86400.0
    return envelope.sign(envelope.JOB_TYPE, json.dumps(payload).encode(), fleet.job_key)


def _deeply_nested_payload(fleet: FleetKeys) -> bytes:
    return envelope.sign(envelope.JOB_TYPE, b"[" * 50_000 + b"]" * 50_000, fleet.job_key)


def _policy_offered_as_job(fleet: FleetKeys) -> bytes:
    return fleet.policy()


def _signature_over_other_payload_type(fleet: FleetKeys) -> bytes:
    """A result-type signature with the payloadType relabelled as a job: the PAE covers the type."""
    env = json.loads(
        envelope.sign(envelope.RESULT_TYPE, dump_model(job_spec(fleet, VID)), fleet.job_key)
    )
    env["payloadType"] = envelope.JOB_TYPE
    return json.dumps(env).encode()


def _bundle_input_byte_flipped(fleet: FleetKeys) -> bytes:
    raw = bytearray(sign_job_bundle(job_spec(fleet, VID), fleet.job_key)[0])
    raw[-3] ^= 0x10
    return bytes(raw)


def _bundle_by_untrusted_key(fleet: FleetKeys) -> bytes:
    return sign_job_bundle(job_spec(fleet, VID), Ed25519PrivateKey.generate())[0]


def _bundle_for_other_vehicle(fleet: FleetKeys) -> bytes:
    return sign_job_bundle(job_spec(fleet, "veh-someone-else"), fleet.job_key)[0]


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
    (_input_over_the_size_limit, "bad_inputs"),
    (_wrong_input_dtype, "bad_inputs"),
    (_missing_field, "malformed_payload"),
    (_wrong_type, "malformed_payload"),
    (_absurd_lifetime, "malformed_payload"),
    (_deeply_nested_payload, "malformed_payload"),
    (_policy_offered_as_job, "wrong_payload_type"),
    (_signature_over_other_payload_type, "bad_signature"),
    (_bundle_input_byte_flipped, "bad_signature"),
    (_bundle_by_untrusted_key, "unknown_key"),
    (_bundle_for_other_vehicle, "wrong_vehicle"),
]


@pytest.mark.parametrize(("make", "reason"), CASES, ids=[c[0].__name__.strip("_") for c in CASES])
async def test_bad_job_is_rejected_and_agent_keeps_serving(rig: Rig, make, reason):
    """Each bad job yields one rejected event with its reason, no run, and the next honest job runs."""
    fleet = rig.fleet
    files = rig.vehicle(extra="max_input_bytes = 8192")
    async with rig.serving(files) as (obs, agent):
        await obs.send_job(make(fleet))
        await wait_for(lambda: any(e["kind"] == "rejected" for e in obs.events), what="rejected")
        rejected = [e for e in obs.events if e["kind"] == "rejected"]
        assert [e["reason"] for e in rejected] == [reason]
        assert rejected[0]["detail"], "a rejection says what was wrong"
        assert agent.counts["running"] == 0
        assert obs.results == []

        await rig.still_serves(obs, agent)


async def test_replayed_job_runs_once_before_and_after_a_restart(rig: Rig):
    """The same signed job delivered again runs once: refused as replayed by the running agent
    and, from the persisted replay record, by the agent after a restart."""
    fleet = rig.fleet
    files = rig.vehicle()
    raw = signed(job_spec(fleet, VID), fleet.job_key)
    async with rig.observe() as obs:
        async with running_agent(files) as agent:
            await obs.send_job(raw)
            await wait_for(lambda: "succeeded" in obs.kinds(), what="first run")
            await obs.send_job(raw)
            await wait_for(lambda: "rejected" in obs.kinds(), what="replay rejected")
            assert agent.counts["running"] == 1
        async with running_agent(files) as agent:
            await obs.send_job(raw)
            await wait_for(lambda: obs.kinds().count("rejected") == 2, what="replay after restart")
            assert agent.counts["running"] == 0
            await rig.still_serves(obs, agent)
    assert [e["reason"] for e in obs.events if e["kind"] == "rejected"] == ["replayed", "replayed"]
    assert len(obs.results) == 2, "the first run and the honest job"


async def test_a_job_bundle_runs_like_the_same_job_as_json(rig: Rig):
    """The same job as a bundle (raw tensors after a signed header) runs, and its result is
    bound to the bundle's digest."""
    from agent.wire.bundle import verify_result
    from agent.wire.keys import KeyRing

    fleet = rig.fleet
    files = rig.vehicle()
    raw, digest = sign_job_bundle(job_spec(fleet, VID, job_id="job-bundle"), fleet.job_key)
    async with rig.serving(files) as (obs, agent):
        await obs.send_job(raw)
        await wait_for(lambda: "succeeded" in obs.kinds("job-bundle"), what="bundle job done")
        await wait_for(lambda: obs.results, what="its result")
        sealed, _ = verify_result(
            obs.results[0], trusted=KeyRing.of(files.key.public_key()), max_bytes=1 << 22
        )
        assert sealed.job_digest == digest
        assert agent.counts["rejected"] == 0
