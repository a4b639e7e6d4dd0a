"""`make demo`: a private Mosquitto, three emulated vehicles, a few hundred jobs, decrypted results.

One vehicle is parked, charging and cool (eligible); one is driving; one is
parked but too hot. Each runs as its own `edge-agent run` process. The fleet
node hands out signed digit-classification jobs from the model's held-out
set, collects the sealed results, verifies and decrypts them, and checks the
predictions against the labels. Only the eligible vehicle may have run jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.kit.credentials import credential_path
from agent.kit.keyfiles import load_signing_key, write_private_key
from agent.kit.mqtt import client_tls
from agent.wire.keys import raw_public
from agent.wire.messages import Limits, ModelRef
from agent.wire.tensors import Tensor
from broker.access import BrokerAccess
from broker.agent_config import agent_toml
from broker.collector import Collector
from broker.fleet import FleetNode
from broker.local import LocalMosquitto
from broker.policy import DAY_S, make_policy, publish_policy, signed_policy
from broker.provision import FleetPki, provision
from broker.shipped import MODELS, SCENARIOS
from broker.store.jobs import JobTemplate
from broker.store.sqlite import JobQueue, SqliteStore


@dataclass(frozen=True)
class DemoVehicle:
    vehicle_id: str
    scenario: str
    eligible: bool


VEHICLES = (
    DemoVehicle("car-parked", "parked-charging", True),
    DemoVehicle("car-driving", "driving", False),
    DemoVehicle("car-hot", "hot-parked", False),
)


def _vehicle_config(
    d: Path, v: DemoVehicle, port: int, pki: FleetPki | None, external: BrokerAccess | None
) -> Path:
    path = d / "agent.toml"
    path.write_text(
        agent_toml(
            v.vehicle_id,
            port=port,
            pki=pki,
            scenario=SCENARIOS / (v.scenario + ".toml"),
            models=MODELS,
            settings={
                "agent": {"capacity": 8, "work_request_interval_s": 0.5},
                **({"broker": _external_broker(external, v, pki)} if external else {}),
            },
            header=f"Written by the demo for {v.vehicle_id}.",
        )
    )
    return path


def _external_broker(
    external: BrokerAccess, v: DemoVehicle, pki: FleetPki | None
) -> dict[str, object | None]:
    """A car's [broker] keys for a broker the demo did not start: its certificate from the
    PKI, or the fleet's login (the demo's cars share it; a real fleet gives each its own)."""
    if pki is not None:
        identity = pki.vehicle(v.vehicle_id)
        if not identity.cert.is_file():
            cars = " ".join(f"--vehicle {x.vehicle_id}" for x in VEHICLES)
            raise DemoError(
                f"the PKI in {external.pki} has no certificate for {v.vehicle_id}: run "
                f"`edge-fleet provision --dir {external.pki} {cars} --host {external.host}`"
            )
        return {
            "tls": True,
            "host": external.host,
            "port": external.port,
            "ca_file": str(pki.ca),
            "cert_file": str(identity.cert),
            "key_file": str(identity.key),
        }
    secret = external.password_file
    if external.password_credential is not None:
        secret = credential_path(external.password_credential)
    return {
        "tls": external.ca_file is not None,
        "host": external.host,
        "port": external.port,
        "ca_file": str(external.ca_file.resolve()) if external.ca_file else None,
        "username": external.username,
        "password_file": str(secret.resolve()) if secret else None,
    }


class DemoError(Exception):
    """The demo cannot run as asked; the message says what to do."""


async def _serve_until_done(
    node: FleetNode, collector: Collector, jobs: int, timeout_s: float
) -> None:
    fleet_task = asyncio.create_task(node.run(), name="fleet-node")
    deadline = time.monotonic() + timeout_s
    while len(collector.results) < jobs and time.monotonic() < deadline:
        if fleet_task.done():
            fleet_task.result()
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # let the last events arrive before the books close
    fleet_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await fleet_task


def run_demo(
    workdir: Path,
    *,
    jobs: int,
    timeout_s: float,
    secure: bool = True,
    external: BrokerAccess | None = None,
) -> dict[str, object]:
    """The demo on a private mosquitto, or with `external` on a broker already running."""
    workdir = workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    manifest = json.loads((MODELS / "manifest.json").read_text())
    digits = next(m for m in manifest["models"] if m["name"] == "digits")
    holdout = np.load(MODELS / "digits_holdout.npz")
    x, y = holdout["x"], holdout["y"]
    jobs = min(jobs, len(y))

    job_key = Ed25519PrivateKey.generate()
    requester = X25519PrivateKey.generate()
    root = Ed25519PrivateKey.generate()
    write_private_key(workdir / "fleet" / "job-signing.key", job_key)
    write_private_key(workdir / "fleet" / "requester.key", requester)
    write_private_key(workdir / "fleet" / "root.key", root)

    def policy(version: int) -> bytes:
        return signed_policy(
            make_policy(
                version=version,
                roots=[root.public_key()],
                threshold=1,
                job_keys=[job_key.public_key()],
                requesters=[requester.public_key()],
                valid_s=DAY_S,
                job_classes=("digits-eval",),
            ),
            [root],
        )

    # Each car is installed with v1; the fleet publishes v2 (retained) and the cars take it.
    installed_policy, published_policy = policy(1), policy(2)

    started = time.monotonic()
    broker: LocalMosquitto | None = None
    if external is None:
        pki = provision(workdir / "pki", [v.vehicle_id for v in VEHICLES]) if secure else None
        broker = LocalMosquitto(workdir / "mosquitto", pki=pki)
        broker.start()
        access = BrokerAccess(
            host="localhost" if pki else broker.host,
            port=broker.port,
            tls=client_tls(pki.ca, pki.fleet.cert, pki.fleet.key) if pki else None,
        )
        mode = "TLS with client certificates and the per-vehicle ACL" if pki else "plaintext"
        print(f"mosquitto listening on 127.0.0.1:{broker.port} ({mode})")
    else:
        access = external
        pki = FleetPki(external.pki) if external.pki else None
        mode = (
            "mutual TLS"
            if pki
            else f"{'TLS' if external.ca_file else 'plaintext'} with login {external.username!r}"
            if external.username
            else "plaintext"
        )
        print(f"using the broker at {external.where} ({mode})")
    login = access.login()
    asyncio.run(
        publish_policy(
            published_policy, host=access.host, port=access.port, tls=access.tls, login=login
        )
    )
    procs: list[subprocess.Popen[bytes]] = []
    vehicle_keys = {}
    try:
        for v in VEHICLES:
            d = workdir / v.vehicle_id
            d.mkdir()
            subprocess.run(
                [sys.executable, "-m", "agent.cli", "keygen", "--out", str(d / "vehicle.key")],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            vehicle_keys[v.vehicle_id] = load_signing_key(d / "vehicle.key").public_key()
            (d / "trust-policy.json").write_bytes(installed_policy)
            config = _vehicle_config(d, v, access.port, pki, external)
            log = (d / "agent.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()

        queue = JobQueue(workdir / "fleet" / "queue.db", lease_s=20.0)
        collector = Collector(
            vehicles=vehicle_keys, requester_key=requester, digest_for=queue.assignment_digest
        )
        node = FleetNode(
            host=access.host,
            tls=access.tls,
            port=access.port,
            store=SqliteStore(queue),
            signing_key=job_key,
            collector=collector,
            login=access.login,
        )
        model = ModelRef(name="digits", sha256=digits["sha256"], size=digits["size"])
        labels: dict[str, int] = {}
        for i in range(jobs):
            template = JobTemplate(
                job_class="digits-eval",
                model=model,
                inputs={"X": Tensor.from_numpy(x[i : i + 1])},
                limits=Limits(max_runtime_s=10),
                requester_key=raw_public(requester.public_key()),
                lifetime_s=300,
            )
            labels[queue.submit(template, now=time.time(), job_id=f"digit-{i:04d}")] = int(y[i])
        print(f"submitted {jobs} jobs; 3 vehicles starting")

        asyncio.run(_serve_until_done(node, collector, jobs, timeout_s))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if broker is not None:
            broker.stop()

    import onnxruntime as ort

    local = ort.InferenceSession(str(MODELS / "digits.onnx"), providers=["CPUExecutionProvider"])
    local_labels = local.run(["label"], {"X": x[:jobs]})[0]
    agree = sum(
        int(c.body.outputs["label"].to_numpy()[0]) == int(local_labels[int(job_id.split("-")[1])])
        for job_id, c in collector.results.items()
    )
    correct = sum(
        int(c.body.outputs["label"].to_numpy()[0]) == labels[job_id]
        for job_id, c in collector.results.items()
    )
    per_vehicle: dict[str, dict[str, Any]] = {}
    for v in VEHICLES:
        ran = [c for c in collector.results.values() if c.vehicle_id == v.vehicle_id]
        per_vehicle[v.vehicle_id] = {
            "scenario": v.scenario,
            "eligible": v.eligible,
            "work_requests": node.work_requests[v.vehicle_id],
            "jobs_received": queue.assignments_by_vehicle().get(v.vehicle_id, 0),
            # Runs that ended: a result, or a failure event. (A car on the lean path, the
            # default, publishes no accepted/running events: agent/wire/messages.py.)
            "jobs_run": len(ran) + node.events[v.vehicle_id]["failed"],
            "results_verified": len(ran),
            "gate_reasons": list(node.status[v.vehicle_id].reasons)
            if v.vehicle_id in node.status
            else None,
            "trust_policy_version": node.status[v.vehicle_id].policy_version
            if v.vehicle_id in node.status
            else None,
        }
    ineligible_ran = sum(
        r["jobs_run"] + r["results_verified"] + r["jobs_received"]
        for r in per_vehicle.values()
        if not r["eligible"]
    )
    verified = len(collector.results)
    report: dict[str, object] = {
        "jobs_submitted": jobs,
        "results_verified_and_decrypted": verified,
        "duplicates_suppressed": collector.duplicates,
        "results_rejected": collector.rejected,
        "accuracy": round(correct / verified, 4) if verified else None,
        "reference_accuracy": digits.get("holdout_accuracy"),
        "agreement_with_local_onnxruntime": round(agree / verified, 4) if verified else None,
        "per_vehicle": per_vehicle,
        "queue": queue.counts(),
        "ineligible_vehicles_ran_jobs": ineligible_ran > 0,
        "wall_seconds": round(time.monotonic() - started, 2),
        "transport": mode,
        "broker": "private mosquitto" if external is None else external.where,
        "ok": verified == jobs
        and ineligible_ran == 0
        and agree == verified
        and all(r["trust_policy_version"] == 2 for r in per_vehicle.values()),
    }
    queue.close()
    return report


def print_report(report: dict[str, object]) -> None:
    per_vehicle = report["per_vehicle"]
    assert isinstance(per_vehicle, dict)
    head = (
        f"{'vehicle':<13}{'scenario':<17}{'policy':>7}{'requests':>9}{'received':>9}"
        f"{'ran':>6}{'results':>9}  gate"
    )
    print("\n" + head + "\n" + "-" * (len(head) + 20))
    for vid, r in per_vehicle.items():
        reasons = ",".join(r["gate_reasons"] or []) or "open"
        print(
            f"{vid:<13}{r['scenario']:<17}{'v' + str(r['trust_policy_version']):>7}"
            f"{r['work_requests']:>9}{r['jobs_received']:>9}"
            f"{r['jobs_run']:>6}{r['results_verified']:>9}  {reasons}"
        )
    print(
        f"\njobs submitted {report['jobs_submitted']}, results verified and decrypted "
        f"{report['results_verified_and_decrypted']}, duplicates suppressed "
        f"{report['duplicates_suppressed']}"
    )
    print(
        f"accuracy of decrypted predictions vs labels: {report['accuracy']} "
        f"(model's reference on the whole held-out set: {report['reference_accuracy']}); "
        f"agreement with onnxruntime run locally: {report['agreement_with_local_onnxruntime']}"
    )
    print(f"wall time {report['wall_seconds']} s; {'OK' if report['ok'] else 'FAILED'}")


def main(
    *,
    jobs: int = 300,
    out: Path = Path("demo-report.json"),
    workdir: Path = Path("demo-run"),
    timeout_s: float = 40.0,
    secure: bool = True,
    external: BrokerAccess | None = None,
) -> int:
    try:
        report = run_demo(workdir, jobs=jobs, timeout_s=timeout_s, secure=secure, external=external)
    except DemoError as exc:
        print(f"edge-fleet demo: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report written to {out}")
    return 0 if report["ok"] else 1
