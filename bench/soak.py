"""`make soak`: jobs through a real agent process while the car, or the machine, interrupts it.

Modes (`python -m bench.soak [--mode cable|kill-worker] [--jobs N]`):
  cable        every 3 s the car's charge cable is pulled or put back through the control
               socket, so jobs are preempted and handed back over and over;
  kill-worker  every 0.3-2 s (at random) the inference worker is sent SIGKILL from outside,
               as the OOM killer or an operator would.
The fleet node (dispatcher and collector) runs here with the product's defaults: a job
fails for good after 3 failures of its own, and preemptions, hand-backs and outside kills
are not failures. The daemon's RSS and open file descriptors are sampled throughout; at the
end every job must have exactly one result and none may have failed. The agent's log is
read afterwards for the jobs that failed and why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.runtime.control import request
from agent.wire.keys import raw_public
from agent.wire.messages import Limits
from bench.common import (
    broker,
    burn_inputs,
    fleet_node,
    model_dir,
    model_ref,
    vehicle_config,
    worker_pid,
    write_result,
)
from broker.store.jobs import JobTemplate

VID = "soak-car"


async def run(jobs: int, rows: int, mode: str = "cable") -> dict[str, Any]:
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
            lease_tick_s=0.5,
        )
        template = JobTemplate(
            job_class="soak",
            model=burn,
            inputs=burn_inputs(rows),
            limits=Limits(max_runtime_s=60),
            requester_key=raw_public(requester.public_key()),
            lifetime_s=3600,
        )
        for _ in range(jobs):
            queue.submit(template, now=time.time())
        fleet = asyncio.create_task(node.run(), name="fleet")
        sock = workdir / VID / "state" / "control.sock"
        samples: list[tuple[float, int, int]] = []
        toggles = kills = 0
        start = time.monotonic()
        rng = random.Random(7)
        try:
            daemon = psutil.Process(proc.pid)
            plugged = True
            next_toggle = start + 3.0
            next_kill = start + rng.uniform(0.3, 2.0)
            sampled_at = 0.0
            while (
                len(collector.results) + queue.counts().get("failed", 0) < jobs
                and time.monotonic() - start < 900
            ):
                await asyncio.sleep(0.05)
                if time.monotonic() - sampled_at >= 0.5:
                    sampled_at = time.monotonic()
                    samples.append(
                        (round(sampled_at - start, 1), daemon.memory_info().rss, daemon.num_fds())
                    )
                if mode == "kill-worker" and time.monotonic() >= next_kill:
                    kills += _kill_worker(daemon)
                    next_kill = time.monotonic() + rng.uniform(0.3, 2.0)
                if mode == "cable" and time.monotonic() >= next_toggle and sock.exists():
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
            "mode": mode,
            "jobs": jobs,
            "rows_per_job": rows,
            "results": len(collector.results),
            "duplicates_suppressed": collector.duplicates,
            "queue": queue.counts(),
            "failed_for_good": queue.counts().get("failed", 0),
            "cable_toggles": toggles,
            "worker_kills": kills,
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


def _kill_worker(daemon: psutil.Process) -> int:
    """SIGKILL the agent's inference worker from outside, if one runs; 1 if one was killed."""
    pid = worker_pid(daemon.pid)
    if pid is None:
        return 0
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        return 1
    return 0


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


def main(jobs: int = 1000, rows: int = 2000, mode: str = "cable") -> dict[str, Any]:
    data = asyncio.run(run(jobs, rows, mode))
    write_result("soak" if mode == "cable" else f"soak-{mode}", data)
    print(
        f"\nsoak ({mode}): {data['results']}/{data['jobs']} results, "
        f"{data['failed_for_good']} failed, in {data['seconds']} s; "
        f"{data['cable_toggles']} cable toggles, {data['worker_kills']} worker kills, "
        f"{data['duplicates_suppressed']} duplicates suppressed; RSS {data['rss_mb']}; "
        f"fds {data['open_fds']}"
    )
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("cable", "kill-worker"), default="cable")
    parser.add_argument("--jobs", type=int, default=None, help="default 1000 (cable), 300 (kill)")
    args = parser.parse_args()
    main(args.jobs or (1000 if args.mode == "cable" else 300), mode=args.mode)
