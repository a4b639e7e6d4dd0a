"""Benchmark 4, idle footprint: the daemon's RSS and CPU over 60 s while the car drives.

`edge-agent run` as its own process, connected to a private mosquitto, on the
driving scenario: the gate is closed, so there is no work and no worker (and
onnxruntime is never imported into the daemon).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.common import broker, model_dir, vehicle_config, write_result


def run(seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, broker(Path(tmp)) as b:
        config = vehicle_config(
            Path(tmp),
            "idle-car",
            port=b.port,
            job_key=Ed25519PrivateKey.generate(),
            models=model_dir(include_realistic=False),
            scenario="driving",
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            p = psutil.Process(proc.pid)
            time.sleep(5.0)  # imports, connection, first gate decision
            cpu0 = sum(p.cpu_times()[:2])
            rss = []
            start = time.monotonic()
            while time.monotonic() - start < seconds:
                rss.append(p.memory_info().rss)
                time.sleep(1.0)
            cpu = sum(p.cpu_times()[:2]) - cpu0
            elapsed = time.monotonic() - start
            children = len(p.children())
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
    return {
        "seconds": round(elapsed, 1),
        "rss_mb": {"max": round(max(rss) / 2**20, 1), "min": round(min(rss) / 2**20, 1)},
        "cpu_share_of_one_core_pct": round(cpu / elapsed * 100, 3),
        "worker_processes": children,
        "onnxruntime_loaded_in_daemon": "onnxruntime" in maps,
        "targets": {"rss_mb": "< 50", "cpu_pct": "< 0.2"},
    }


def main(seconds: float = 60.0) -> dict[str, Any]:
    data = run(seconds)
    write_result("idle", data)
    print(
        f"\nidle footprint while driving, {data['seconds']} s: RSS max {data['rss_mb']['max']} MB, "
        f"CPU {data['cpu_share_of_one_core_pct']} % of a core, workers {data['worker_processes']}, "
        f"onnxruntime in daemon: {data['onnxruntime_loaded_in_daemon']}"
    )
    return data


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 60.0)
