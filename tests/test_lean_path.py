"""The lean per-job path: with the default `job_events = "lean"`, a job that succeeds costs
the job, its result and (at most) one work request on the wire; events that hand a job back
or end it otherwise are still published. Counted by a client that sees every message of the
car, with the real agent, fleet node and broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter

import numpy as np
import pytest

from agent.wire.hints import is_hint
from agent.wire.messages import Limits
from agent.wire.tensors import Tensor
from agent.wire.topics import PREFIX, Channel, parse_topic
from broker.collector import Collector
from broker.fleet import FleetNode
from broker.store.jobs import JobTemplate
from broker.store.sqlite import JobQueue, SqliteStore
from tests.support import FleetKeys, fleet_client, running_agent, wait_for, write_vehicle
from tests.test_fleet import DIGITS_REF, template

pytestmark = pytest.mark.broker
JOBS = 20


@contextlib.asynccontextmanager
async def _wire(port: int, vehicle_id: str):
    """Every message to and from `vehicle_id`, by kind (job, hint, result, work, event:KIND)."""
    seen: Counter[str] = Counter()
    async with fleet_client(port, identifier=f"sniffer-{time.time_ns()}") as client:
        await client.subscribe(f"{PREFIX}/{vehicle_id}/#", qos=1)

        async def pump() -> None:
            async for m in client.messages:
                where = parse_topic(m.topic.value)
                if where is None or not isinstance(m.payload, bytes) or m.retain:
                    continue
                channel = where[1]
                if channel is Channel.JOBS:
                    seen["hint" if is_hint(m.payload) else "job"] += 1
                elif channel is Channel.EVENTS:
                    seen[f"event:{json.loads(m.payload)['kind']}"] += 1
                elif channel is not Channel.STATUS:
                    seen[channel.value] += 1

        task = asyncio.create_task(pump())
        try:
            yield seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _run(mosquitto, fleet: FleetKeys, tmp_path, job_events: str, templates):
    files = write_vehicle(tmp_path, "lean-car", port=mosquitto.port, fleet=fleet)
    text = files.config_path.read_text().replace(
        'job_events = "all"', f'job_events = "{job_events}"'
    )
    files.config_path.write_text(text)
    queue = JobQueue(tmp_path / "q.db")
    node = FleetNode(
        host="127.0.0.1",
        port=mosquitto.port,
        store=SqliteStore(queue),
        signing_key=fleet.job_key,
        collector=Collector(
            vehicles={"lean-car": files.key.public_key()}, requester_key=fleet.requester
        ),
        lease_tick_s=0.2,
        node=f"lean-{time.time_ns()}",
    )
    ids = [queue.submit(t, now=time.time()) for t in templates]
    task = asyncio.create_task(node.run())
    try:
        await wait_for(lambda: node.ready.is_set(), what="fleet ready")
        async with _wire(mosquitto.port, "lean-car") as seen, running_agent(files):
            await wait_for(
                lambda: all(queue.state_of(j)[0] in ("done", "failed") for j in ids),
                timeout=30,
                what="every job ended",
            )
            await asyncio.sleep(0.5)  # the last messages reach the sniffer
            wire = Counter(seen)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    states = Counter(queue.state_of(j)[0] for j in ids)
    queue.close()
    return wire, states, node


async def test_a_job_that_succeeds_costs_three_messages_or_fewer(mosquitto, fleet, tmp_path):
    wire, states, node = await _run(
        mosquitto, fleet, tmp_path, "lean", [template(fleet.requester, row=i) for i in range(JOBS)]
    )
    assert states == {"done": JOBS}
    assert len(node.collector.results) == JOBS
    folded = {
        k: n for k, n in wire.items() if k in ("event:accepted", "event:running", "event:succeeded")
    }
    assert folded == {}, f"informational events on the wire: {folded}"
    assert wire["job"] == JOBS and wire["results"] == JOBS, wire
    # A request answered "no work" (a hint) is idle traffic, counted apart (docs/scale.md).
    asked_for_work = wire["work"] - node.hints["no_work"]
    per_job = (wire["job"] + wire["results"] + asked_for_work) / JOBS
    assert per_job <= 3.0, f"{per_job:.2f} messages per job: {dict(wire)}, {node.hints}"


async def test_with_every_event_the_same_jobs_cost_six(mosquitto, fleet, tmp_path):
    """The control: `job_events = "all"` publishes accepted, running and succeeded per job."""
    wire, states, _ = await _run(
        mosquitto, fleet, tmp_path, "all", [template(fleet.requester, row=i) for i in range(JOBS)]
    )
    assert states == {"done": JOBS}
    for kind in ("accepted", "running", "succeeded"):
        assert wire[f"event:{kind}"] == JOBS, wire
    per_job = sum(n for k, n in wire.items() if k != "hint" and not k.startswith("event:heart"))
    assert per_job / JOBS > 5.0, dict(wire)


async def test_the_lean_path_still_says_when_a_job_is_refused(mosquitto, fleet, tmp_path):
    """A job the car refuses (inputs its model does not take) is handed back with a published
    `rejected` event, lean or not: the fleet counts the failure at once, not at lease end."""
    bad = JobTemplate(
        job_class="digits-eval",
        model=DIGITS_REF,
        inputs={"Y": Tensor.from_numpy(np.zeros((1, 64), np.float32))},
        limits=Limits(max_runtime_s=10),
        requester_key=template(fleet.requester).requester_key,
        lifetime_s=60,
    )
    wire, states, node = await _run(
        mosquitto, fleet, tmp_path, "lean", [bad, template(fleet.requester)]
    )
    assert wire["event:rejected"] >= 1, wire
    assert node.events["lean-car"]["rejected"] >= 1
    assert states["done"] == 1
