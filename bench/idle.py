"""Benchmark 4, idle footprint: the daemon's RSS and CPU while the car drives (no worker).

The daemon is run as a car runs it: the console script the systemd unit starts
(`edge-agent run`), from compiled bytecode as an installed package has it, with
a car's config (mutual TLS to the broker, a root-signed trust policy, metrics
off: the defaults), against a private mosquitto with the fleet's TLS and ACL.

The unit starts /usr/bin/edge-agent: a console script of the operating system's
python3 (a distribution package or a system-wide install), and that interpreter
is the one measured where this machine has it in the venv's minor version, with
the venv's packages on its path. Debian builds it statically and optimised; this
checkout's venv may come from another build (pyenv links libpython as a shared
library: 0.8 MB more resident), so one fresh run under the venv's interpreter is
reported beside it.

- **fresh**: started while driving (the target case): 60 s after a 5 s start-up;
- **after work**: the car first charges and runs a few hundred jobs handed out by
  the real fleet node, then drives; measured once the worker is gone;
- **metrics on**: fresh, with the Prometheus endpoint a rig would turn on;
- **venv python**: fresh, under the interpreter of this checkout's venv.
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.wire.keys import raw_public
from agent.wire.messages import Limits
from agent.wire.tensors import Tensor
from bench.common import (
    REPO,
    broker,
    fleet_node,
    model_dir,
    model_ref,
    vehicle_config,
    write_result,
)
from broker.fleet import FleetNode
from broker.provision import provision
from broker.store.jobs import JobTemplate

VID = "idle-car"
WORK_S = 15.0  # the "after work" car charges this long, then drives off


SYSTEM_PYTHON = Path("/usr/bin/python3")


def system_python() -> str | None:
    """The operating system's python3, if it has the venv's minor version (the venv's
    compiled packages and bytecode then work under it), else None."""
    if not SYSTEM_PYTHON.exists():
        return None
    version = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return str(SYSTEM_PYTHON.resolve()) if version == str(sys.version_info[:2]) else None


def _command(interpreter: str | None) -> tuple[list[str], dict[str, str]]:
    """The unit's ExecStart (`edge-agent`), under `interpreter` or else the venv's own."""
    python = interpreter or sys.executable
    script = Path(sys.executable).with_name("edge-agent")
    argv = [python, str(script)] if script.exists() else [python, "-m", "agent.cli"]
    if interpreter is None:
        return argv, dict(os.environ)
    path = os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"]])
    return argv, {**os.environ, "PYTHONPATH": path}


def _compile() -> None:
    """An installed package has its bytecode compiled (pip and dpkg do it); this checkout may
    not (this VM sets PYTHONDONTWRITEBYTECODE), and compiling at every import leaves ~1 MB of
    the compiler's memory behind."""
    compileall.compile_dir(REPO / "agent", quiet=1)


@contextlib.contextmanager
def _daemon(config: Path, interpreter: str | None) -> Iterator[psutil.Process]:
    argv, env = _command(interpreter)
    proc = subprocess.Popen(
        [*argv, "run", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield psutil.Process(proc.pid)
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)


def _measure(p: psutil.Process, seconds: float) -> dict[str, Any]:
    cpu0 = sum(p.cpu_times()[:2])
    rss, uss = [], []
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        full = p.memory_full_info()
        rss.append(full.rss)
        uss.append(full.uss)
        time.sleep(1.0)
    cpu = sum(p.cpu_times()[:2]) - cpu0
    elapsed = time.monotonic() - start
    maps = Path(f"/proc/{p.pid}/maps").read_text()
    return {
        "seconds": round(elapsed, 1),
        "rss_mb": {"max": round(max(rss) / 2**20, 1), "min": round(min(rss) / 2**20, 1)},
        "uss_mb_max": round(max(uss) / 2**20, 1),
        "cpu_share_of_one_core_pct": round(cpu / elapsed * 100, 3),
        "worker_processes": len(p.children()),
        "onnxruntime_loaded_in_daemon": "onnxruntime" in maps,
    }


def _charge_then_drive(workdir: Path) -> Path:
    path = workdir / "charge-then-drive.toml"
    path.write_text(f"""description = "Charging (jobs run), then on the road."

[initial]
gear = "P"
plugged_in = true
charging = true
compute_temp_c = 30.0
ambient_temp_c = 18.0

[[events]]
at_s = {WORK_S}
gear = "D"
plugged_in = false
charging = false
""")
    return path


async def _hand_out_work(node: FleetNode, until: float) -> None:
    task = asyncio.create_task(node.run(), name="bench-fleet")
    try:
        while time.time() < until:
            await asyncio.sleep(0.2)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def fresh(tmp: Path, seconds: float, interpreter: str | None, agent: str = "") -> dict[str, Any]:
    pki = provision(tmp / "pki", [VID])
    with broker(tmp, pki=pki) as b:
        config = vehicle_config(
            tmp,
            VID,
            port=b.port,
            job_key=Ed25519PrivateKey.generate(),
            models=model_dir(include_realistic=False),
            scenario="driving",
            agent=agent,
            pki=pki,
        )
        with _daemon(config, interpreter) as p:
            time.sleep(5.0)  # imports, TLS connection, policy, first gate decision
            return _measure(p, seconds)


def after_work(tmp: Path, seconds: float, jobs: int, interpreter: str | None) -> dict[str, Any]:
    pki = provision(tmp / "pki", [VID])
    job_key, requester = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    models = model_dir(include_realistic=False)
    with broker(tmp, pki=pki) as b:
        config = vehicle_config(
            tmp,
            VID,
            port=b.port,
            job_key=job_key,
            models=models,
            scenario=str(_charge_then_drive(tmp)),
            agent="capacity = 4",
            pki=pki,
            requester=requester,
        )
        node, queue, collector = fleet_node(
            tmp, VID, b, job_key=job_key, requester=requester, pki=pki
        )
        model = model_ref(models, "digits")
        rng = np.random.default_rng(4)
        for _ in range(jobs):
            queue.submit(
                JobTemplate(
                    job_class="bench",
                    model=model,
                    inputs={"X": Tensor.from_numpy(rng.uniform(0, 16, (1, 64)).astype(np.float32))},
                    limits=Limits(max_runtime_s=10),
                    requester_key=raw_public(requester.public_key()),
                    lifetime_s=300,
                ),
                now=time.time(),
            )
        with _daemon(config, interpreter) as p:
            asyncio.run(_hand_out_work(node, until=time.time() + WORK_S))
            deadline = time.monotonic() + 60
            while p.children() and time.monotonic() < deadline:
                time.sleep(0.5)  # the worker leaves after agent.worker_idle_s without work
            time.sleep(2.0)
            data = _measure(p, seconds)
        queue.close()
    return {**data, "jobs_done_before_driving": len(collector.results)}


def run(seconds: float) -> dict[str, Any]:
    _compile()
    car = system_python()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs["fresh"] = fresh(Path(tmp), seconds, car)
    with tempfile.TemporaryDirectory() as tmp:
        runs["after_work"] = after_work(Path(tmp), min(seconds, 30.0), jobs=400, interpreter=car)
    with tempfile.TemporaryDirectory() as tmp:
        runs["metrics_on"] = fresh(Path(tmp), min(seconds, 20.0), car, agent="metrics_port = 9464")
    if car is not None:
        with tempfile.TemporaryDirectory() as tmp:
            runs["venv_python"] = fresh(Path(tmp), min(seconds, 20.0), None)
    return {
        **runs["fresh"],
        "runs": runs,
        "daemon": "edge-agent run: compiled bytecode, mutual TLS, trust policy, metrics off",
        "interpreter": {
            "path": car or sys.executable,
            "why": "the operating system's python3, as the unit's /usr/bin/edge-agent runs"
            if car
            else "this checkout's venv (no system python3 of the same minor version here)",
            "venv_python_run": sys.executable if car else None,
        },
        "targets": {"rss_mb": "< 50", "cpu_pct": "< 0.2"},
    }


def main(seconds: float = 60.0) -> dict[str, Any]:
    data = run(seconds)
    write_result("idle", data)
    print(f"\nidle footprint while driving (no worker), under {data['interpreter']['path']}")
    print(f"{'run':<12}{'seconds':>8}{'RSS max MB':>11}{'USS MB':>8}{'CPU %':>8}{'workers':>8}")
    for name, r in data["runs"].items():
        print(
            f"{name:<12}{r['seconds']:>8}{r['rss_mb']['max']:>11}{r['uss_mb_max']:>8}"
            f"{r['cpu_share_of_one_core_pct']:>8}{r['worker_processes']:>8}"
        )
    return data


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 60.0)
