"""`make soak`: a thousand jobs while the car is unplugged and plugged in every few seconds.

The agent runs as its own process; the fleet node (dispatcher and collector) runs here.
Every 3 s the car's charge cable is pulled or put back through the control socket, so
jobs are preempted and handed back over and over. The daemon's RSS and open file
descriptors are sampled throughout; at the end every job must have exactly one result.
The agent's log is read afterwards for the jobs that failed and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.control import request
from agent.wire.keys import raw_public
from agent.wire.messages import Limits
from agent.wire.tensors import Tensor
from bench.common import broker, fleet_node, model_dir, model_ref, vehicle_config, write_result
from broker.queue import JobTemplate

VID = "soak-car"


async def run(jobs: int, rows: int) -> dict[str, Any]:
    models = model_dir(include_realistic=False)
    burn = model_ref(models, "burn")
    job_key, requester = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    with tempfile.TemporaryDirectory() as tmp, broker(Path(tmp)) as b:
        workdir = Path(tmp)
        config = vehicle_config(
            workdir,
            VID,
            port=b.port,
            job_key=job_key,
            models=models,
            limits="power_cap_w = 2000",
            agent="capacity = 4",
        )
        log = workdir / "agent.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(  # noqa: ASYNC220 - starting it is instant
                [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        node, queue, collector = fleet_node(
            workdir,
            VID,
            b,
            job_key=job_key,
            requester=requester,
            lease_s=10,
            max_attempts=1000,
            lease_tick_s=0.5,
        )
        template = JobTemplate(
            job_class="soak",
            model=burn,
            inputs={
                "x": Tensor.from_numpy(np.ones((1, 256), np.float32)),
                "rows_by_256": Tensor.from_numpy(np.array([rows, 256], np.int64)),
            },
            limits=Limits(max_runtime_s=60),
            requester_key=raw_public(requester.public_key()),
            lifetime_s=3600,
        )
        for _ in range(jobs):
            queue.submit(template, now=time.time())
        fleet = asyncio.create_task(node.run(), name="fleet")
        sock = workdir / VID / "state" / "control.sock"
        samples: list[tuple[float, int, int]] = []
        toggles = 0
        start = time.monotonic()
        try:
            daemon = psutil.Process(proc.pid)
            plugged = True
            next_toggle = start + 3.0
            while len(collector.results) < jobs and time.monotonic() - start < 900:
                await asyncio.sleep(0.5)
                samples.append(
                    (round(time.monotonic() - start, 1), daemon.memory_info().rss, daemon.num_fds())
                )
                if time.monotonic() >= next_toggle and sock.exists():
                    plugged = not plugged
                    reply = await asyncio.to_thread(
                        request, sock, {"op": "set", "fields": {"plugged_in": plugged}}
                    )
                    toggles += bool(reply.get("ok"))
                    next_toggle = time.monotonic() + 3.0
            if not plugged:
                await asyncio.to_thread(
                    request, sock, {"op": "set", "fields": {"plugged_in": True}}
                )
            status = await asyncio.to_thread(request, sock, {"op": "status"})
        finally:
            fleet.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fleet
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
        counts = status.get("status", {}).get("counts", {})
        failures = _failures(log)
        settled = [s for s in samples if s[0] >= 10.0] or samples
        return {
            "jobs": jobs,
            "rows_per_job": rows,
            "results": len(collector.results),
            "duplicates_suppressed": collector.duplicates,
            "queue": queue.counts(),
            "cable_toggles": toggles,
            "agent_counts": counts,
            "failures": failures[:20],
            "seconds": round(time.monotonic() - start, 1),
            "rss_mb": {
                "after_10s": round(settled[0][1] / 2**20, 1),
                "end": round(samples[-1][1] / 2**20, 1),
                "max": round(max(s[1] for s in samples) / 2**20, 1),
            },
            "open_fds": {
                "after_10s": settled[0][2],
                "end": samples[-1][2],
                "max": max(s[2] for s in samples),
            },
        }


def _failures(log: Path) -> list[dict[str, Any]]:
    """The agent's job_failed events: job, reason, detail, time."""
    import json

    found = []
    for line in log.read_text(errors="replace").splitlines():
        if '"job_failed"' not in line:
            continue
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            found.append({k: event.get(k) for k in ("timestamp", "job_id", "reason", "detail")})
    return found


def main(jobs: int = 1000, rows: int = 2000) -> dict[str, Any]:
    data = asyncio.run(run(jobs, rows))
    write_result("soak", data)
    print(
        f"\nsoak: {data['results']}/{data['jobs']} results in {data['seconds']} s, "
        f"{data['cable_toggles']} cable toggles, {data['duplicates_suppressed']} duplicates "
        f"suppressed; RSS {data['rss_mb']}; fds {data['open_fds']}"
    )
    return data


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
