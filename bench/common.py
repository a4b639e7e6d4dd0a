"""Shared pieces of the benchmarks: the machine's name, a broker, agent configs, the models, results."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.kit.keyfiles import load_signing_key, write_private_key
from agent.kit.mqtt import client_tls
from agent.wire.keys import KeyRing, key_id, raw_public
from agent.wire.messages import JobSpec, Limits, ModelRef
from agent.wire.tensors import Tensor
from broker.agent_config import agent_toml
from broker.collector import Collector
from broker.fleet import FleetNode
from broker.local import LocalMosquitto
from broker.policy import make_policy, signed_policy
from broker.provision import FleetPki
from broker.store.sqlite import JobQueue, SqliteStore

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / "cache"
RESULTS = REPO / "bench" / "results"
SCENARIOS = REPO / "agent" / "vehicle" / "scenarios"
RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
REC_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    import onnxruntime

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **data}, indent=2) + "\n")
    return path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values)


def realistic_model() -> Path:
    """PP-OCRv4 text recognition, taken from the rapidocr-onnxruntime wheel (fetched once, here)."""
    target = CACHE / "ppocr_rec.onnx"
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = CACHE / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), RAPIDOCR],
        check=True,
    )
    wheel = next(wheels.glob("rapidocr_onnxruntime-*.whl"))
    with zipfile.ZipFile(wheel) as zf, zf.open(REC_MEMBER) as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    return target


def model_dir(include_realistic: bool) -> Path:
    """A model folder for the agent: the shipped models, plus PP-OCRv4 rec if asked."""
    folder = CACHE / ("models-full" if include_realistic else "models")
    folder.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((REPO / "models" / "manifest.json").read_text())
    for m in manifest["models"]:
        shutil.copy2(REPO / "models" / m["file"], folder / m["file"])
    if include_realistic:
        src = realistic_model()
        data = src.read_bytes()
        shutil.copy2(src, folder / "ppocr_rec.onnx")
        manifest["models"].append(
            {
                "name": "ppocr-rec",
                "file": "ppocr_rec.onnx",
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "inputs": {"x": {"dtype": "float32", "shape": [None, 3, 48, None]}},
            }
        )
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def model_ref(models: Path, name: str) -> ModelRef:
    """The pin of `name` in the model folder's manifest, as a job names it."""
    entry = next(
        m for m in json.loads((models / "manifest.json").read_text())["models"] if m["name"] == name
    )
    return ModelRef(name=name, sha256=entry["sha256"], size=entry["size"])


def bench_job(
    job_id: str,
    vehicle_id: str,
    model: ModelRef,
    inputs: dict[str, Tensor],
    *,
    job_key: Ed25519PrivateKey,
    requester: X25519PrivateKey,
    max_runtime_s: float,
) -> JobSpec:
    """A first attempt of a `bench` job, issued now, valid for an hour."""
    now = time.time()
    return JobSpec(
        job_id=job_id,
        attempt=1,
        issuer=key_id(job_key.public_key()),
        issued_at=now,
        expires_at=now + 3600,
        vehicle_id=vehicle_id,
        job_class="bench",
        model=model,
        inputs=inputs,
        limits=Limits(max_runtime_s=max_runtime_s),
        requester_key=raw_public(requester.public_key()),
    )


@contextlib.contextmanager
def broker(workdir: Path, pki: FleetPki | None = None) -> Iterator[LocalMosquitto]:
    """A private mosquitto: plaintext on loopback, or with `pki` as in production (TLS, client
    certificates, the ACL)."""
    b = LocalMosquitto(workdir / "mosquitto", pki=pki)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def vehicle_config(
    workdir: Path,
    vehicle_id: str,
    *,
    port: int,
    job_key: Ed25519PrivateKey,
    models: Path,
    scenario: str = "parked-charging",
    limits: str = "",
    agent: str = "",
    pki: FleetPki | None = None,
    requester: X25519PrivateKey | None = None,
) -> Path:
    """A vehicle's config. By default the bench rig's: a fixed job-key list, a plaintext
    loopback broker. With `pki` (provisioned for `vehicle_id`), a car's: mutual TLS, and a
    root-signed trust policy delegating `job_key` and naming `requester`. `scenario`: a
    shipped scenario's name or a scenario file's path."""
    d = workdir / vehicle_id
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "vehicle.key").exists():
        write_private_key(d / "vehicle.key", Ed25519PrivateKey.generate())
    if pki is None:
        (d / "trusted-job-keys.json").write_bytes(KeyRing.of(job_key.public_key()).to_file())
    else:
        root = Ed25519PrivateKey.generate()
        policy = make_policy(
            version=1,
            roots=[root.public_key()],
            threshold=1,
            job_keys=[job_key.public_key()],
            requesters=[(requester or X25519PrivateKey.generate()).public_key()],
        )
        (d / "trust-policy.json").write_bytes(signed_policy(policy, [root]))
    path = d / "agent.toml"
    path.write_text(
        agent_toml(
            vehicle_id,
            port=port,
            pki=pki,
            scenario=Path(scenario)
            if scenario.endswith(".toml")
            else SCENARIOS / (scenario + ".toml"),
            models=models,
            trust="keys" if pki is None else "policy",
            settings={
                "owner": {"consent_version": "bench", "consent_date": dt.date(2026, 11, 30)},
                "limits": {
                    "max_compute_temp_c": 110.0,
                    "resume_compute_temp_c": 100.0,
                    "daily_energy_wh": 100000,
                },
            },
            raw={"limits": limits, "agent": agent},
        )
    )
    return path


def fleet_node(
    workdir: Path,
    vehicle_id: str,
    b: LocalMosquitto,
    *,
    job_key: Ed25519PrivateKey,
    requester: X25519PrivateKey,
    pki: FleetPki | None = None,
    lease_s: float = 20.0,
    max_attempts: int = 3,
    lease_tick_s: float = 1.0,
) -> tuple[FleetNode, JobQueue, Collector]:
    """The real fleet node for one bench vehicle (made by `vehicle_config` in `workdir`): its
    job queue, and a collector that verifies the vehicle's results and opens them with
    `requester`. Over mutual TLS with `pki`, else plaintext to the loopback broker."""
    queue = JobQueue(workdir / "fleet.db", lease_s=lease_s, max_attempts=max_attempts)
    collector = Collector(
        vehicles={vehicle_id: load_signing_key(workdir / vehicle_id / "vehicle.key").public_key()},
        requester_key=requester,
        digest_for=queue.assignment_digest,
    )
    node = FleetNode(
        host="localhost" if pki else "127.0.0.1",
        port=b.port,
        tls=client_tls(pki.ca, pki.fleet.cert, pki.fleet.key) if pki else None,
        store=SqliteStore(queue),
        signing_key=job_key,
        collector=collector,
        lease_tick_s=lease_tick_s,
    )
    return node, queue, collector


# ---- the agent as a process, seen from outside --------------------------------------------


@contextlib.asynccontextmanager
async def agent_process(config: Path, log: Path) -> AsyncIterator[subprocess.Popen[bytes]]:
    """`edge-agent run --config CONFIG` as its own process, output to `log`; stopped (SIGTERM,
    then SIGKILL after 20 s) when the block ends."""
    import asyncio

    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - starting it is instant
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, 20)
        if proc.poll() is None:
            proc.kill()


def worker_pid(agent_pid: int) -> int | None:
    """The agent's inference worker process, if one runs."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(agent_pid).children():
            if "agent.inference.worker" in " ".join(child.cmdline()):
                return int(child.pid)
    return None


def cpu_ns(pid: int) -> int | None:
    """CPU time of all of a process's threads, from schedstat (the process's own schedstat
    file is its main thread's only); None once it is gone."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total


def burn_inputs(rows: int) -> dict[str, Tensor]:
    """Inputs of the compute-bound `burn` model: about 40 us of one core per row."""
    return {
        "x": Tensor.from_numpy(np.ones((1, 256), np.float32)),
        "rows_by_256": Tensor.from_numpy(np.array([rows, 256], np.int64)),
    }
