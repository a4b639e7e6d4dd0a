"""What `edge-fleet` runs for its longer commands: submit, jobs, serve, broker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sqlite3
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from agent.kit.exitcodes import ExitCode
from agent.kit.keyfiles import load_requester_key, load_signing_key
from agent.wire.codec import parse_model
from agent.wire.errors import Reason
from agent.wire.keys import VehicleRegistryFile, ed25519_public, raw_public
from broker.store import POSTGRES_SCHEMES, JobStore, StoreError, open_store
from broker.store.jobs import STATES, JobTemplate

QueueError = StoreError  # the name the command line has always caught


async def open_queue(where: str, **kw: float) -> JobStore:
    """The job store a command names: a SQLite file, or a postgresql:// URL."""
    try:
        return await open_store(where, **kw)  # type: ignore[arg-type]
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the queue {where}: {exc}") from None


def _must_exist(where: str) -> None:
    if not where.startswith(POSTGRES_SCHEMES) and not Path(where).is_file():
        raise StoreError(f"no queue at {where} (edge-fleet submit --queue makes one)")


async def jobs(args: argparse.Namespace) -> int:
    """The queue's jobs by state, as JSON; with --wait-done S, wait until none is queued or
    leased (exit 0) or S seconds pass (exit 1)."""
    _must_exist(args.queue)
    store = await open_queue(args.queue)
    deadline = time.monotonic() + (args.wait_done or 0.0)
    try:
        while True:
            counts = await store.counts()
            open_jobs = counts.get("queued", 0) + counts.get("leased", 0)
            if args.wait_done is None or open_jobs == 0 or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.5)
    finally:
        await store.close()
    print(json.dumps(counts))
    return ExitCode.OK if args.wait_done is None or open_jobs == 0 else ExitCode.CRASH


async def queue_summary(args: argparse.Namespace) -> int:
    """`edge-fleet queue`: counts by state, the oldest lease and the parked cars."""
    _must_exist(args.queue)
    store = await open_queue(args.queue)
    try:
        summary = await store.summary()
    finally:
        await store.close()
    now = time.time()
    out = {
        "jobs": {state: summary.counts.get(state, 0) for state in STATES},
        "oldest_lease_age_s": None
        if summary.oldest_lease_at is None
        else round(now - summary.oldest_lease_at, 1),
        "parked_vehicles": summary.parked_vehicles,
    }
    print(json.dumps(out) if args.json else _summary_text(out))
    return ExitCode.OK


def _summary_text(out: Mapping[str, object]) -> str:
    jobs_by_state = out["jobs"]
    assert isinstance(jobs_by_state, dict)
    lines = [f"{state:>8}  {n}" for state, n in jobs_by_state.items()]
    age = out["oldest_lease_age_s"]
    lines.append(f"oldest lease: {'none' if age is None else f'{age} s ago'}")
    lines.append(f"parked (idle, waiting to be woken): {out['parked_vehicles']}")
    return "\n".join(lines)


def digit_templates(models: Path, requester_key: Path, count: int) -> list[JobTemplate]:
    import numpy as np

    from agent.wire.messages import Limits, ModelRef
    from agent.wire.tensors import Tensor

    manifest = json.loads((models / "manifest.json").read_text())
    digits = next(m for m in manifest["models"] if m["name"] == "digits")
    x = np.load(models / "digits_holdout.npz")["x"]
    requester = load_requester_key(requester_key)
    model = ModelRef(name="digits", sha256=digits["sha256"], size=digits["size"])
    return [
        JobTemplate(
            job_class="digits-eval",
            model=model,
            inputs={"X": Tensor.from_numpy(x[i % len(x) : i % len(x) + 1])},
            limits=Limits(max_runtime_s=10),
            requester_key=raw_public(requester.public_key()),
            lifetime_s=3600,
        )
        for i in range(count)
    ]


async def submit(args: argparse.Namespace) -> int:
    templates = digit_templates(args.models, args.requester_key, args.count)
    store = await open_queue(args.queue)
    try:
        for template in templates:
            await store.submit(template, now=time.time(), expires_in_s=args.expires_in)
        states = await store.counts()
    finally:
        await store.close()
    print(json.dumps({"queued": args.count, "queue": str(args.queue), "states": states}))
    return ExitCode.OK


async def serve(args: argparse.Namespace) -> int:
    from broker.access import access_from_args
    from broker.collector import Collector
    from broker.fleet import FleetNode
    from broker.metrics import FleetMetrics

    access = access_from_args(args)  # before anything is opened: bad options change nothing
    registry = parse_model(
        args.registry.read_bytes(),
        VehicleRegistryFile,
        what="registry",
        reason=Reason.MALFORMED_PAYLOAD,
    )
    store = await open_queue(args.queue, lease_s=args.lease_s, max_attempts=args.max_failures)
    collector = Collector(
        vehicles={v.vehicle_id: ed25519_public(v.public_key) for v in registry.vehicles},
        requester_key=load_requester_key(args.requester_key),
    )
    metrics = FleetMetrics(registry=None)
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.metrics_host, registry=metrics.registry)
    node = FleetNode(
        tls=access.tls,
        host=access.host,
        port=access.port,
        login=access.login,
        store=store,
        signing_key=load_signing_key(args.job_key),
        collector=collector,
        node=args.node,
        group=args.group,
        session_expiry_s=args.session_expiry,
        idle_retry_s=args.idle_retry,
        reap_after_s=args.reap_after,
        metrics=metrics,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(node.run(), name="fleet-node")
    await asyncio.wait(
        {task, asyncio.create_task(stop.wait(), name="stop")}, return_when=asyncio.FIRST_COMPLETED
    )
    await node.say_goodbye()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    print(
        json.dumps(
            {
                "node": args.node,
                "queue": await store.counts(),
                "results": len(collector.results),
                "duplicates": collector.duplicates,
                "rejected": collector.rejected,
            }
        )
    )
    await store.close()
    return ExitCode.OK


def run_broker(args: argparse.Namespace) -> int:
    """A local mosquitto until SIGINT/SIGTERM: plaintext on loopback, or with --tls the
    fleet's secure config (mutual TLS, the per-vehicle ACL) on --listen."""
    from broker.local import BrokerError, LocalMosquitto
    from broker.provision import FleetPki

    pki = None
    if args.tls is not None:
        pki = FleetPki(args.tls)
        if not pki.ca.is_file() or not pki.broker.cert.is_file():
            print(
                f"no fleet PKI in {args.tls}: run `edge-fleet provision --dir {args.tls} "
                "--host <broker name>` first",
                file=sys.stderr,
            )
            return ExitCode.CONFIG
    try:
        with LocalMosquitto(args.workdir, port=args.port, pki=pki, host=args.listen) as b:
            mode = "mutual TLS with the ACL" if pki else "plaintext, loopback only"
            print(f"mosquitto on {b.host}:{b.port}, {mode} (Ctrl-C to stop)", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except BrokerError as exc:
        print(exc, file=sys.stderr)
        return ExitCode.CONFIG
    return ExitCode.OK
