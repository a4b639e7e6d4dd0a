"""An agent in this process against a private broker, with a client that pushes signed jobs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.assembly import build_agent
from agent.config import load_config
from agent.daemon import Agent
from agent.wire import envelope
from agent.wire.codec import dump_model
from agent.wire.keys import key_id, raw_public
from agent.wire.messages import JobSpec, Limits, ModelRef
from agent.wire.mqtt import NO_DELAY
from agent.wire.tensors import Tensor
from agent.wire.topics import Channel, topic
from bench.common import broker, model_dir, vehicle_config

VID = "bench-car"


class Pusher:
    def __init__(self, client: aiomqtt.Client, job_key: Ed25519PrivateKey, burn: ModelRef) -> None:
        self.client, self.job_key, self.burn = client, job_key, burn
        self.requester = X25519PrivateKey.generate()
        self.n = 0

    async def burn_job(self, rows: int) -> str:
        self.n += 1
        now = time.time()
        spec = JobSpec(
            job_id=f"b{self.n:05d}",
            attempt=1,
            issuer=key_id(self.job_key.public_key()),
            issued_at=now,
            expires_at=now + 3600,
            vehicle_id=VID,
            job_class="bench",
            model=self.burn,
            inputs={
                "x": Tensor.from_numpy(np.ones((1, 256), np.float32)),
                "rows_by_256": Tensor.from_numpy(np.array([rows, 256], np.int64)),
            },
            limits=Limits(max_runtime_s=3600),
            requester_key=raw_public(self.requester.public_key()),
        )
        raw = envelope.sign(envelope.JOB_TYPE, dump_model(spec), self.job_key)
        await self.client.publish(topic(VID, Channel.JOBS), raw, qos=1)
        return spec.job_id


@contextlib.asynccontextmanager
async def agent_with_pusher(
    workdir: Path, *, limits: str = "", agent: str = ""
) -> AsyncIterator[tuple[Agent, Pusher]]:
    import json

    models = model_dir(include_realistic=False)
    entry = next(
        m
        for m in json.loads((models / "manifest.json").read_text())["models"]
        if m["name"] == "burn"
    )
    burn = ModelRef(name="burn", sha256=entry["sha256"], size=entry["size"])
    job_key = Ed25519PrivateKey.generate()
    with broker(workdir) as b:
        config = vehicle_config(
            workdir, VID, port=b.port, job_key=job_key, models=models, limits=limits, agent=agent
        )
        the_agent = build_agent(load_config(config))
        stop = asyncio.Event()
        task = asyncio.create_task(the_agent.run(stop), name="bench-agent")
        try:
            async with aiomqtt.Client("127.0.0.1", b.port, socket_options=NO_DELAY) as client:
                while not the_agent._connected.is_set():
                    await asyncio.sleep(0.01)
                yield the_agent, Pusher(client, job_key, burn)
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=30)
