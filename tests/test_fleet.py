"""The fleet side: the leased job queue, the collector's checks, and dispatch through the real broker."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.wire import envelope
from agent.wire.bundle import encode_result_body, sign_result
from agent.wire.codec import parse_model
from agent.wire.errors import Reason, WireError
from agent.wire.keys import raw_public
from agent.wire.messages import SUITE, JobSpec, Limits, ResultBody, SealedResult
from agent.wire.sealing import result_info, seal
from agent.wire.tensors import Tensor
from broker.collector import Collector
from broker.fleet import FleetNode
from broker.store.jobs import JobTemplate, counts_as_failure
from broker.store.sqlite import JobQueue, SqliteStore
from tests.support import DIGITS_REF, FleetKeys, holdout, running_agent, wait_for, write_vehicle


def template(requester: X25519PrivateKey, row: int = 0) -> JobTemplate:
    x = holdout()[0][row : row + 1]
    return JobTemplate(
        job_class="digits-eval",
        model=DIGITS_REF,
        inputs={"X": Tensor.from_numpy(x)},
        limits=Limits(max_runtime_s=10),
        requester_key=raw_public(requester.public_key()),
        lifetime_s=60,
    )


@pytest.mark.parametrize(
    ("kind", "reason", "failure"),
    [
        ("preempted", "not_parked", False),
        ("preempted", "unplugged,not_charging", False),
        ("released", "gate_closed", False),
        ("released", "agent_restarted", False),
        ("released", "worker_killed", False),
        ("released", "busy", False),
        ("failed", "worker_crashed", True),
        ("failed", "deadline_exceeded", True),
        ("failed", "agent_error", True),
        ("rejected", "bad_inputs", True),
        ("rejected", "gate_closed", False),
    ],
)
def test_only_the_job_failing_counts_against_it(kind, reason, failure):
    """Preemptions and car-first hand-backs are never a failure; failed and rejected are."""
    assert counts_as_failure(kind, reason) is failure


def test_a_low_order_requester_key_cannot_be_submitted():
    """The fleet refuses a job whose results could never be sealed (all-zero X25519 key)."""
    good = template(X25519PrivateKey.generate())
    with pytest.raises(ValueError, match="low-order"):
        JobTemplate(**{**good.model_dump(), "requester_key": bytes(32)})


class _Sent:
    """One result as a vehicle would produce it, for tampering."""

    def __init__(self) -> None:
        self.vehicle = Ed25519PrivateKey.generate()
        self.requester = X25519PrivateKey.generate()
        self.digest = "d" * 64
        self.body = ResultBody(
            job_id="job-1",
            attempt=1,
            vehicle_id="veh-1",
            model_sha256=DIGITS_REF.sha256,
            outputs={"label": Tensor.from_numpy(np.array([7]))},
            runtime_ms=1.0,
            finished_at=1.0,
        )

    def sealed(self, *, job_id: str = "job-1", body: bytes | None = None) -> SealedResult:
        info = result_info(job_id, 1, "veh-1", self.digest)
        ct = seal(body or encode_result_body(self.body), self.requester.public_key(), info)
        return SealedResult(
            job_id=job_id,
            attempt=1,
            vehicle_id="veh-1",
            job_digest=self.digest,
            suite=SUITE,
            ciphertext=ct,
        )

    def raw(self, sealed: SealedResult, key: Ed25519PrivateKey | None = None) -> bytes:
        return sign_result(sealed, key or self.vehicle)

    def collector(self) -> Collector:
        sent = {("job-1", 1, "veh-1"): self.digest, ("job-2", 1, "veh-1"): "e" * 64}
        return Collector(
            vehicles={"veh-1": self.vehicle.public_key()},
            requester_key=self.requester,
            digest_for=lambda j, a, v: sent.get((j, a, v)),
        )


def test_collector_accepts_once_and_counts_duplicates():
    """A good result is accepted and decrypted; the same result again is a counted duplicate."""
    s = _Sent()
    c = s.collector()
    raw = s.raw(s.sealed())
    got = c.accept("veh-1", raw)
    assert not got.duplicate and got.body.outputs["label"].to_numpy().tolist() == [7]
    assert c.accept("veh-1", raw).duplicate and c.duplicates == 1


def _moved_to_other_job(s: _Sent) -> bytes:
    return sign_result(s.sealed().model_copy(update={"job_id": "job-2"}), s.vehicle)


def _ciphertext_flipped_then_signed(s: _Sent) -> bytes:
    sealed = s.sealed()
    ct = bytearray(sealed.ciphertext)
    ct[40] ^= 1
    return sign_result(sealed.model_copy(update={"ciphertext": bytes(ct)}), s.vehicle)


def _ciphertext_flipped_on_the_wire(s: _Sent) -> bytes:
    raw = bytearray(s.raw(s.sealed()))
    raw[-5] ^= 1
    return bytes(raw)


def _header_signed_as_a_job(s: _Sent) -> bytes:
    raw = s.raw(s.sealed())
    n = int.from_bytes(raw[4:8], "little")
    env = json.loads(raw[8 : 8 + n])
    header = base64.b64decode(env["payload"])
    resigned = envelope.sign(envelope.JOB_TYPE, header, s.vehicle)
    return raw[:4] + len(resigned).to_bytes(4, "little") + resigned + raw[8 + n :]


@pytest.mark.parametrize(
    ("make", "topic_vehicle", "reason"),
    [
        (
            lambda s: s.raw(s.sealed(), key=Ed25519PrivateKey.generate()),
            "veh-1",
            Reason.UNKNOWN_KEY,
        ),
        (lambda s: s.raw(s.sealed()), "veh-9", Reason.UNKNOWN_KEY),
        (_moved_to_other_job, "veh-1", Reason.UNKNOWN_JOB),
        (lambda s: s.raw(s.sealed(job_id="job-3")), "veh-1", Reason.UNKNOWN_JOB),
        (_ciphertext_flipped_then_signed, "veh-1", Reason.BAD_CIPHERTEXT),
        (_ciphertext_flipped_on_the_wire, "veh-1", Reason.BAD_SIGNATURE),
        (_header_signed_as_a_job, "veh-1", Reason.WRONG_PAYLOAD_TYPE),
        (lambda s: b"EFB1\x00", "veh-1", Reason.MALFORMED_PAYLOAD),
    ],
    ids=[
        "not-signed-by-vehicle",
        "unregistered-vehicle",
        "moved-to-other-job",
        "never-sent",
        "ciphertext-flipped-then-signed",
        "ciphertext-flipped-on-the-wire",
        "wrong-type",
        "truncated",
    ],
)
def test_collector_refuses_tampered_results(make, topic_vehicle, reason):
    """Results that are moved, altered, or not signed by the vehicle that ran them are refused."""
    s = _Sent()
    c = s.collector()
    with pytest.raises(WireError) as err:
        c.accept(topic_vehicle, make(s))
    assert err.value.reason is reason
    assert c.results == {}


@pytest.mark.broker
async def test_dispatch_to_three_vehicles_only_the_eligible_one_runs(mosquitto, fleet, tmp_path):
    """Through the real broker: every job ends as one verified result, all from the eligible car."""
    q = JobQueue(tmp_path / "fleet.db", lease_s=30)
    files = {
        vid: write_vehicle(tmp_path, vid, port=mosquitto.port, fleet=fleet, scenario=sc)
        for vid, sc in (
            ("ok-car", "parked-charging"),
            ("drive-car", "driving"),
            ("hot-car", "hot-parked"),
        )
    }
    collector = Collector(
        vehicles={vid: f.key.public_key() for vid, f in files.items()},
        requester_key=fleet.requester,
        digest_for=q.assignment_digest,
    )
    node = FleetNode(
        host="127.0.0.1",
        port=mosquitto.port,
        store=SqliteStore(q),
        signing_key=fleet.job_key,
        collector=collector,
        lease_tick_s=0.2,
    )
    start = time.time()
    ids = [q.submit(template(fleet.requester, row=i), now=start + i * 1e-3) for i in range(40)]
    node_task = asyncio.create_task(node.run(), name="fleet")
    try:
        await wait_for(lambda: node.ready.is_set(), what="fleet ready")
        async with contextlib.AsyncExitStack() as stack:
            for f in files.values():
                await stack.enter_async_context(running_agent(f))
            await wait_for(
                lambda: len(collector.results) == len(ids), timeout=30, what="all results"
            )
    finally:
        node_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await node_task
    assert {c.vehicle_id for c in collector.results.values()} == {"ok-car"}
    assert set(collector.results) == set(ids)
    assert q.counts() == {"done": 40}
    assert node.work_requests["drive-car"] == 0 and node.work_requests["hot-car"] == 0
    assert q.assignments_by_vehicle() == {"ok-car": 40}
    q.close()


def test_the_dispatcher_sends_large_inputs_as_a_bundle(tmp_path):
    """Jobs with at least 64 KiB of input are signed as bundles (raw tensors), small ones as
    JSON envelopes; both verify to the job the fleet meant, bound to the digest it records."""
    from agent.wire.bundle import is_bundle, verify_job_bundle
    from agent.wire.keys import KeyRing
    from broker.store.jobs import Lease

    fleet = FleetKeys()
    node = FleetNode(
        host="127.0.0.1",
        port=1,
        store=SqliteStore(JobQueue(tmp_path / "q.db")),
        signing_key=fleet.job_key,
        collector=_Sent().collector(),
    )
    ring = KeyRing.of(fleet.job_key.public_key())
    for rows, bundled in ((1, False), (300, True)):  # 256 B vs 76.8 KB of float32
        template = JobTemplate(
            job_class="digits-eval",
            model=DIGITS_REF,
            inputs={"X": Tensor.from_numpy(np.zeros((rows, 64), np.float32))},
            limits=Limits(max_runtime_s=10),
            requester_key=b"\x03" * 32,
            lifetime_s=60,
        )
        raw, digest = node.sign_job(Lease("job-1", 1, template, float("inf")), "veh-1", time.time())
        assert is_bundle(raw) is bundled
        if bundled:
            verified, job = verify_job_bundle(raw, trusted=ring, max_bytes=1 << 22)
        else:
            verified = envelope.verify(
                raw, payload_type=envelope.JOB_TYPE, trusted=ring, max_bytes=1 << 22
            )
            job = parse_model(
                verified.payload, JobSpec, what="job", reason=Reason.MALFORMED_PAYLOAD
            )
        assert verified.digest == digest
        assert job.inputs["X"].shape == (rows, 64)
