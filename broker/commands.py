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
from pathlib import Path

from agent.kit.exitcodes import ExitCode
from agent.kit.keyfiles import load_requester_key, load_signing_key
from agent.wire.codec import parse_model
from agent.wire.errors import Reason
from agent.wire.keys import VehicleRegistryFile, ed25519_public, raw_public
from broker.queue import JobQueue


def plaintext_refused(args: argparse.Namespace) -> bool:
    """True (and says so) when a fleet tool is asked to talk plaintext to a remote broker."""
    from agent.kit.mqtt import is_loopback

    if args.pki is None and not is_loopback(args.host):
        print(
            f"refusing plaintext to {args.host}: give --pki (see edge-fleet provision)",
            file=sys.stderr,
        )
        return True
    return False


class QueueError(Exception):
    """The job queue's database cannot be opened or used."""


def open_queue(path: Path, **kw: float) -> JobQueue:
    if not path.parent.is_dir():
        raise QueueError(
            f"cannot open the queue {path}: the folder {path.parent} does not exist "
            f"(mkdir -p {path.parent})"
        )
    try:
        return JobQueue(path, **kw)  # type: ignore[arg-type]
    except sqlite3.Error as exc:
        raise QueueError(f"cannot open the queue {path}: {exc}") from None


def jobs(args: argparse.Namespace) -> int:
    """The queue's jobs by state, as JSON; with --wait-done S, wait until none is queued or
    leased (exit 0) or S seconds pass (exit 1)."""
    if not args.queue.is_file():
        raise QueueError(f"no queue at {args.queue} (edge-fleet submit --queue makes one)")
    queue = open_queue(args.queue)
    deadline = time.monotonic() + (args.wait_done or 0.0)
    try:
        while True:
            counts = queue.counts()
            open_jobs = counts.get("queued", 0) + counts.get("leased", 0)
            if args.wait_done is None or open_jobs == 0 or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    finally:
        queue.close()
    print(json.dumps(counts))
    return ExitCode.OK if args.wait_done is None or open_jobs == 0 else ExitCode.CRASH


def submit(args: argparse.Namespace) -> int:
    import numpy as np

    from agent.wire.messages import Limits, ModelRef
    from agent.wire.tensors import Tensor
    from broker.queue import JobTemplate

    manifest = json.loads((args.models / "manifest.json").read_text())
    digits = next(m for m in manifest["models"] if m["name"] == "digits")
    x = np.load(args.models / "digits_holdout.npz")["x"]
    requester = load_requester_key(args.requester_key)
    queue = open_queue(args.queue)
    model = ModelRef(name="digits", sha256=digits["sha256"], size=digits["size"])
    for i in range(args.count):
        row = x[i % len(x) : i % len(x) + 1]
        queue.submit(
            JobTemplate(
                job_class="digits-eval",
                model=model,
                inputs={"X": Tensor.from_numpy(row)},
                limits=Limits(max_runtime_s=10),
                requester_key=raw_public(requester.public_key()),
                lifetime_s=3600,
            ),
            now=time.time(),
            expires_in_s=args.expires_in,
        )
    print(json.dumps({"queued": args.count, "queue": str(args.queue), "states": queue.counts()}))
    queue.close()
    return ExitCode.OK


async def serve(args: argparse.Namespace) -> int:
    if plaintext_refused(args):
        return ExitCode.USAGE
    from broker.collector import Collector
    from broker.fleet import FleetNode

    registry = parse_model(
        args.registry.read_bytes(),
        VehicleRegistryFile,
        what="registry",
        reason=Reason.MALFORMED_PAYLOAD,
    )
    queue = open_queue(args.queue, lease_s=args.lease_s, max_attempts=args.max_failures)
    collector = Collector(
        vehicles={v.vehicle_id: ed25519_public(v.public_key) for v in registry.vehicles},
        requester_key=load_requester_key(args.requester_key),
        digest_for=queue.assignment_digest,
    )
    tls = None
    if args.pki is not None:
        from agent.kit.mqtt import client_tls
        from broker.provision import FleetPki

        pki = FleetPki(args.pki)
        tls = client_tls(pki.ca, pki.fleet.cert, pki.fleet.key)
    node = FleetNode(
        tls=tls,
        host=args.host,
        port=args.port,
        queue=queue,
        signing_key=load_signing_key(args.job_key),
        collector=collector,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(node.run(), name="fleet-node")
    await asyncio.wait(
        {task, asyncio.create_task(stop.wait(), name="stop")}, return_when=asyncio.FIRST_COMPLETED
    )
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    print(
        json.dumps(
            {
                "queue": queue.counts(),
                "results": len(collector.results),
                "duplicates": collector.duplicates,
                "rejected": collector.rejected,
            }
        )
    )
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
