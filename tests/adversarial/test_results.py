"""THREATS.md 16-18 on results a real agent produced over mutual TLS: only the requester's key
opens them, other vehicles cannot even receive them, and the collector refuses a result moved to
another job, altered in one byte, or signed by anyone but the vehicle that ran it."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.wire import envelope
from agent.wire.bundle import decode_result_body, sign_result, verify_result
from agent.wire.errors import Reason, WireError
from agent.wire.keys import KeyRing
from agent.wire.sealing import open_sealed, result_info
from agent.wire.topics import Channel, topic
from broker.collector import Collector
from tests.adversarial.conftest import OTHER, VID, Rig
from tests.support import burn_spec, signed, wait_for

pytestmark = pytest.mark.broker


async def _two_real_results(rig: Rig) -> tuple[dict[str, bytes], dict[str, str], object]:
    """Results of two burn jobs run by a real agent, the digests the fleet signed, the files."""
    fleet = rig.fleet
    files = rig.vehicle()
    raws = {}
    digests = {}
    async with rig.serving(files) as (obs, _agent):
        for job_id in ("job-1", "job-2"):
            raw_job = signed(burn_spec(fleet, VID, rows=100, job_id=job_id), fleet.job_key)
            digests[job_id] = envelope.verify(
                raw_job,
                payload_type=envelope.JOB_TYPE,
                trusted=KeyRing.of(fleet.job_key.public_key()),
                max_bytes=1 << 22,
            ).digest
            await obs.send_job(raw_job)
            await wait_for(lambda j=job_id: "succeeded" in obs.kinds(j), what=f"{job_id} done")
        await wait_for(lambda: len(obs.results) == 2, what="two results")
        for raw in obs.results:
            sealed, _ = verify_result(
                raw, trusted=KeyRing.of(files.key.public_key()), max_bytes=1 << 22
            )
            raws[sealed.job_id] = raw
    return raws, digests, files


def _collector(rig: Rig, files, digests: dict[str, str]) -> Collector:
    return Collector(
        vehicles={VID: files.key.public_key()},
        requester_key=rig.fleet.requester,
        digest_for=lambda j, a, v: digests.get(j) if v == VID and a == 1 else None,
    )


async def test_only_the_requester_can_read_a_result_and_other_vehicles_get_none(rig: Rig):
    """The requester's key opens the result; another key cannot (bad_ciphertext); the output
    values never appear in clear on the wire; a second vehicle subscribed to this vehicle's
    results receives nothing (the ACL)."""
    import asyncio

    import aiomqtt

    from agent.kit.mqtt import client_tls

    identity = rig.pki.vehicle(OTHER)
    spy = aiomqtt.Client(
        "localhost",
        rig.port,
        tls_context=client_tls(rig.pki.ca, identity.cert, identity.key),
        protocol=aiomqtt.ProtocolVersion.V5,
    )
    spied: list[bytes] = []
    async with spy:
        await spy.subscribe(topic(VID, Channel.RESULTS), qos=1)
        await spy.subscribe("fleet/v1/vehicles/+/results", qos=1)

        async def pump() -> None:
            async for m in spy.messages:
                spied.append(m.payload)  # type: ignore[arg-type]

        pumper = asyncio.create_task(pump())
        raws, _digests, files = await _two_real_results(rig)
        await asyncio.sleep(0.3)
        pumper.cancel()
    assert spied == []
    sealed, _ = verify_result(
        raws["job-1"], trusted=KeyRing.of(files.key.public_key()), max_bytes=1 << 22
    )
    info = result_info(sealed.job_id, sealed.attempt, sealed.vehicle_id, sealed.job_digest)
    body = decode_result_body(open_sealed(sealed.ciphertext, rig.fleet.requester, info))
    y = body.outputs["y"].to_numpy()
    assert y.shape == (256,) and np.all(np.isfinite(y))
    assert y.tobytes() not in raws["job-1"], "outputs travel only as ciphertext"
    with pytest.raises(WireError) as err:
        open_sealed(sealed.ciphertext, X25519PrivateKey.generate(), info)
    assert err.value.reason is Reason.BAD_CIPHERTEXT


def _edit_header(raw: bytes, **changes: object) -> bytes:
    """Change fields of the signed header without the vehicle's key (as the broker could)."""
    n = int.from_bytes(raw[4:8], "little")
    env = json.loads(raw[8 : 8 + n])
    header = json.loads(base64.b64decode(env["payload"]))
    header.update(changes)
    env["payload"] = base64.b64encode(json.dumps(header).encode()).decode()
    edited = json.dumps(env).encode()
    return raw[:4] + len(edited).to_bytes(4, "little") + edited + raw[8 + n :]


async def test_the_collector_refuses_moved_altered_and_forged_results(rig: Rig):
    """Real results, then: relabelled to the other job by the broker, re-signed for the other job
    by the vehicle itself, one byte flipped, signed by another key: each refused with its
    reason; the genuine results are accepted once."""
    raws, digests, files = await _two_real_results(rig)
    key = Ed25519PrivateKey.generate()
    vehicle_key = files.key
    sealed1, _ = verify_result(
        raws["job-1"], trusted=KeyRing.of(vehicle_key.public_key()), max_bytes=1 << 22
    )
    flipped = bytearray(raws["job-1"])
    flipped[-7] ^= 0x01
    cases = [
        (_edit_header(raws["job-1"], job_id="job-2"), {Reason.BAD_SIGNATURE}),
        (
            sign_result(sealed1.model_copy(update={"job_id": "job-2"}), vehicle_key),
            {Reason.UNKNOWN_JOB, Reason.BAD_CIPHERTEXT},
        ),
        (bytes(flipped), {Reason.BAD_SIGNATURE}),
        (sign_result(sealed1, key), {Reason.UNKNOWN_KEY}),
    ]
    collector = _collector(rig, files, digests)
    for raw, reasons in cases:
        with pytest.raises(WireError) as err:
            collector.accept(VID, raw)
        assert err.value.reason in reasons, err.value
    assert collector.results == {}
    for job_id in ("job-1", "job-2"):
        assert not collector.accept(VID, raws[job_id]).duplicate
    assert set(collector.results) == {"job-1", "job-2"}
    with pytest.raises(WireError) as err:
        collector.accept(OTHER, raws["job-1"])  # the right bytes on another vehicle's topic
    assert err.value.reason is Reason.UNKNOWN_KEY
