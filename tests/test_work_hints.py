"""Idle cars stay quiet: 'no work' and 'work available' hints (agent/wire/hints.py), checked
on the wire codec and with the real agent, fleet node and broker."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.wire.errors import Reason, WireError
from agent.wire.hints import HintKind, WorkHint, is_hint, sign_hint, verify_hint
from agent.wire.keys import KeyRing
from agent.wire.topics import Channel, topic
from broker.collector import Collector
from broker.fleet import FleetNode
from broker.store.sqlite import JobQueue, SqliteStore
from tests.support import FleetKeys, fleet_client, running_agent, wait_for, write_vehicle
from tests.test_fleet import template

NOW = 1_800_000_000.0


def _hint(key: Ed25519PrivateKey, **kw: object) -> bytes:
    fields: dict[str, object] = {
        "vehicle_id": "car-1",
        "kind": HintKind.NO_WORK,
        "retry_after_s": 600.0,
        "issued_at": NOW,
        "expires_at": NOW + 60,
    }
    fields.update(kw)
    return sign_hint(WorkHint.model_validate(fields), key)


def test_a_hint_verifies_only_for_its_car_its_key_and_its_time():
    key = Ed25519PrivateKey.generate()
    ring = KeyRing.of(key.public_key())
    raw = _hint(key)
    assert is_hint(raw)
    hint = verify_hint(raw, trusted=ring, vehicle_id="car-1", now=NOW + 1, max_skew_s=30)
    assert hint.kind is HintKind.NO_WORK and hint.retry_after_s == 600
    refusals = [
        (raw, "car-2", NOW, Reason.WRONG_VEHICLE),
        (raw, "car-1", NOW + 200, Reason.EXPIRED),
        (raw, "car-1", NOW - 100, Reason.NOT_YET_VALID),
        (_hint(Ed25519PrivateKey.generate()), "car-1", NOW, Reason.UNKNOWN_KEY),
        (raw.replace(b'"sig":"', b'"sig":"AA'), "car-1", NOW, Reason.BAD_SIGNATURE),
        (raw[:-5], "car-1", NOW, Reason.MALFORMED_ENVELOPE),
        (raw + b" " * 4096, "car-1", NOW, Reason.OVERSIZED),
    ]
    for bad, vehicle, now, reason in refusals:
        with pytest.raises(WireError) as refused:
            verify_hint(bad, trusted=ring, vehicle_id=vehicle, now=now, max_skew_s=30)
        assert refused.value.reason is reason, (vehicle, now, refused.value)


@pytest.mark.parametrize(
    "fields",
    [
        {"expires_at": NOW + 3600},  # lives longer than 300 s
        {"expires_at": NOW},  # no life at all
        {"retry_after_s": 7200.0},  # silence beyond the cap
        {"retry_after_s": -1.0},
        {"kind": "go_away"},
    ],
)
def test_a_hint_outside_its_bounds_cannot_even_be_made(fields):
    with pytest.raises(ValueError, match="validation error for WorkHint"):
        _hint(Ed25519PrivateKey.generate(), **fields)


def test_a_job_is_never_taken_for_a_hint():
    from agent.wire import envelope

    assert not is_hint(envelope.sign(envelope.JOB_TYPE, b"{}", Ed25519PrivateKey.generate()))
    assert not is_hint(b"")


@contextlib.asynccontextmanager
async def _node(mosquitto, fleet: FleetKeys, queue: JobQueue, **kw: object):
    collector = Collector(vehicles={}, requester_key=fleet.requester)
    node = FleetNode(
        host="127.0.0.1",
        port=mosquitto.port,
        store=SqliteStore(queue),
        signing_key=fleet.job_key,
        collector=collector,
        lease_tick_s=0.2,
        wake_tick_s=0.2,
        node=f"hints-{time.time_ns()}",
        session_expiry_s=0,
        **kw,  # type: ignore[arg-type]
    )
    task = asyncio.create_task(node.run(), name="fleet")
    try:
        await wait_for(lambda: node.ready.is_set(), what="fleet ready")
        yield node
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.broker
async def test_an_idle_car_asks_once_then_waits_and_new_work_wakes_it(mosquitto, fleet, tmp_path):
    """With work_request_interval_s 0.3, an idle car would ask about 10 times in 3 s. Told
    'no work', it asks once; a job queued later wakes it, and it runs the job at once."""
    queue = JobQueue(tmp_path / "q.db")
    files = write_vehicle(tmp_path, "quiet-car", port=mosquitto.port, fleet=fleet)
    async with (
        _node(mosquitto, fleet, queue, idle_retry_s=600.0) as node,
        running_agent(files) as agent,
    ):
        await wait_for(lambda: node.hints["no_work"] >= 1, what="told no work")
        asked = node.work_requests["quiet-car"]
        await asyncio.sleep(3.0)
        assert node.work_requests["quiet-car"] == asked, "quiet while told no work"
        submitted = time.monotonic()
        job = queue.submit(template(fleet.requester), now=time.time())
        await wait_for(lambda: queue.state_of(job)[0] != "queued", what="picked up")
        picked_up_s = time.monotonic() - submitted
        assert node.hints["work_available"] >= 1
        assert agent.counts["work_hints"] >= 2
    assert picked_up_s < 5.0, f"woken within seconds, took {picked_up_s:.1f} s"
    queue.close()


@pytest.mark.broker
async def test_without_hints_an_idle_car_keeps_asking_and_a_forged_hint_cannot_silence_it(
    mosquitto, fleet, tmp_path
):
    """The control: a fleet that sends no hints sees a request every interval. A 'no work'
    hint signed by a key the car does not trust is refused and counted; the car asks on."""
    queue = JobQueue(tmp_path / "q.db")
    files = write_vehicle(tmp_path, "loud-car", port=mosquitto.port, fleet=fleet)
    forger = Ed25519PrivateKey.generate()
    forged = sign_hint(
        WorkHint(
            vehicle_id="loud-car",
            kind=HintKind.NO_WORK,
            retry_after_s=3600,
            issued_at=time.time(),
            expires_at=time.time() + 60,
        ),
        forger,
    )
    async with (
        _node(mosquitto, fleet, queue, idle_retry_s=0.0) as node,
        running_agent(files) as agent,
    ):
        await wait_for(lambda: node.work_requests["loud-car"] >= 1, what="first request")
        async with fleet_client(mosquitto.port, identifier="forger") as client:
            await client.publish(topic("loud-car", Channel.JOBS), forged, qos=1)
        await wait_for(lambda: agent.counts["hints_refused"] >= 1, what="forged hint refused")
        asked = node.work_requests["loud-car"]
        await asyncio.sleep(2.0)
        assert node.work_requests["loud-car"] >= asked + 4, "still asking every 0.3 s"
        assert node.hints == {}
    queue.close()
