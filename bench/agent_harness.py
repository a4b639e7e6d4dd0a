"""An agent in this process against a private broker, with a client that pushes signed jobs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.assembly import build_agent
from agent.config import load_config
from agent.daemon import Agent
from agent.kit.mqtt import NO_DELAY
from agent.wire import envelope
from agent.wire.codec import dump_model
from agent.wire.messages import ModelRef
from agent.wire.topics import Channel, topic
from bench.common import bench_job, broker, burn_inputs, model_dir, model_ref, vehicle_config

VID = "bench-car"


class Pusher:
    def __init__(self, client: aiomqtt.Client, job_key: Ed25519PrivateKey, burn: ModelRef) -> None:
        self.client, self.job_key, self.burn = client, job_key, burn
        self.requester = X25519PrivateKey.generate()
        self.n = 0

    async def burn_job(self, rows: int) -> str:
        self.n += 1
        spec = bench_job(
            f"b{self.n:05d}",
            VID,
            self.burn,
            burn_inputs(rows),
            job_key=self.job_key,
            requester=self.requester,
            max_runtime_s=3600,
        )
        raw = envelope.sign(envelope.JOB_TYPE, dump_model(spec), self.job_key)
        await self.client.publish(topic(VID, Channel.JOBS), raw, qos=1)
        return spec.job_id


@contextlib.asynccontextmanager
async def agent_with_pusher(
    workdir: Path, *, limits: str = "", agent: str = ""
) -> AsyncIterator[tuple[Agent, Pusher]]:
    models = model_dir(include_realistic=False)
    burn = model_ref(models, "burn")
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
                while not the_agent.status()["connected"]:
                    await asyncio.sleep(0.01)
                yield the_agent, Pusher(client, job_key, burn)
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=30)
