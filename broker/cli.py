"""`edge-fleet`: the fleet side's command line.

edge-fleet demo [--jobs N]            the end-to-end demo (make demo)
edge-fleet broker [--port P]          a local Mosquitto for trying things out
edge-fleet keygen --job-key PATH --trusted-out PATH
                                      a job-signing key and the trusted-keys file for vehicles
edge-fleet keygen --requester-key PATH
                                      a requester's X25519 key for receiving results
edge-fleet keygen --root-key PATH     a fleet root key (keep it offline)
edge-fleet policy sign --root-key PATH... --job-key PATH... --requester-key PATH...
                       --version N --out FILE [--threshold K] [--also-sign-with PATH...]
                       [--valid-days D] [--job-class NAME...]
                                      a root-signed trust policy (offline)
edge-fleet policy publish --policy FILE [--host H --port P --pki DIR]
                                      put it on the retained policy topic for every vehicle
edge-fleet register --registry PATH --vehicle-id ID --public-key B64
                                      record a vehicle's result-signing key
edge-fleet submit --queue DB --requester-key PATH [--count N]
                                      queue digit jobs from the shipped held-out set
edge-fleet provision --dir DIR [--vehicle ID ...] [--host NAME ...]
                                      the fleet CA, broker and fleet-tool certificates
                                      (first run), and a certificate per vehicle
edge-fleet serve --queue DB --job-key PATH --requester-key PATH --registry PATH
                 [--host H --port P --pki DIR] [--node NAME] [--metrics-port P]
                                      the dispatcher and collector (mutual TLS with --pki);
                                      several, each its own --node, share a PostgreSQL queue
edge-fleet queue --queue DB           jobs by state, the oldest lease, the parked cars
edge-fleet vehicles [--host H --port P --pki DIR]
                                      every car's retained status: connected, gate, policy
edge-fleet simulate --vehicles N --registry PATH ...
                                      N virtual cars on the real wire (load tests)

DB is a SQLite file or a postgresql:// URL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent import __version__
from agent.kit import logs
from agent.kit.exitcodes import ExitCode
from agent.kit.keyfiles import load_requester_key, load_signing_key, write_private_key
from agent.wire.codec import dump_model, parse_model
from agent.wire.errors import Reason, WireError
from agent.wire.keys import (
    KeyFileError,
    KeyRing,
    VehicleKey,
    VehicleRegistryFile,
    ed25519_public,
    key_id,
    public_b64,
)
from agent.wire.topics import check_vehicle_id
from broker import commands, operate
from broker.access import AccessError, access_from_args, add_broker_options, broker_said
from broker.argtypes import positive_float, positive_int
from broker.shipped import MODELS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-fleet", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"edge-fleet {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the end-to-end demo")
    demo.add_argument("--jobs", type=int, default=300, help="digit jobs to submit (default 300)")
    demo.add_argument(
        "--report", type=Path, default=Path("demo-report.json"), help="the JSON summary"
    )
    demo.add_argument(
        "--workdir", type=Path, default=Path("demo-run"), help="keys, configs and logs go here"
    )
    demo.add_argument(
        "--plaintext",
        action="store_true",
        help="a plaintext loopback broker instead of mutual TLS with the ACL",
    )
    add_broker_options(demo, host=None, port=None)
    br = sub.add_parser("broker", help="run a local mosquitto until Ctrl-C")
    br.add_argument("--port", type=int, default=1883, help="(default 1883; 8883 is usual for TLS)")
    br.add_argument(
        "--workdir", type=Path, default=Path("broker-run"), help="its config and log go here"
    )
    br.add_argument(
        "--tls",
        type=Path,
        metavar="PKI",
        help="the folder from `edge-fleet provision`: mutual TLS and the per-vehicle ACL",
    )
    br.add_argument(
        "--listen",
        default="127.0.0.1",
        metavar="ADDR",
        help="the address to listen on (default 127.0.0.1; plaintext stays on loopback)",
    )
    jb = sub.add_parser("jobs", help="the queue's jobs by state, as JSON")
    jb.add_argument(
        "--queue", required=True, help="the queue: a SQLite file, or a postgresql:// URL"
    )
    jb.add_argument(
        "--wait-done",
        type=positive_float,
        metavar="S",
        help="wait up to S seconds until no job is queued or leased (exit 1 if some still are)",
    )
    kg = sub.add_parser("keygen", help="make fleet keys")
    kg.add_argument("--job-key", type=Path, help="write an Ed25519 job-signing key here")
    kg.add_argument(
        "--trusted-out", type=Path, help="with --job-key: the trusted-keys file for bench rigs"
    )
    kg.add_argument(
        "--requester-key", type=Path, help="write an X25519 key that receives results here"
    )
    kg.add_argument(
        "--root-key", type=Path, help="write an offline root key here (keep it off-line)"
    )
    pol = sub.add_parser("policy", help="sign or publish the fleet's trust policy")
    polsub = pol.add_subparsers(dest="policy_command", required=True)
    ps = polsub.add_parser("sign", help="write a root-signed trust policy")
    ps.add_argument(
        "--root-key",
        type=Path,
        action="append",
        required=True,
        metavar="PATH",
        help="a root key that signs and is named in the policy (repeat for several roots)",
    )
    ps.add_argument(
        "--threshold", type=int, default=1, help="root signatures a car requires (default 1)"
    )
    ps.add_argument(
        "--also-sign-with",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="old root keys, when the roots rotate (the vehicles' held roots must sign)",
    )
    ps.add_argument(
        "--job-key",
        type=Path,
        action="append",
        required=True,
        metavar="PATH",
        help="a job-signing key the policy delegates (repeat)",
    )
    ps.add_argument(
        "--requester-key",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="a requester results may be sealed to (repeat)",
    )
    ps.add_argument(
        "--version", type=int, required=True, help="higher than the policy the cars hold"
    )
    ps.add_argument("--valid-days", type=float, default=30.0, help="(default 30)")
    ps.add_argument(
        "--job-class",
        action="append",
        default=[],
        metavar="NAME",
        help="limit the job keys to these classes (repeat; default: any)",
    )
    ps.add_argument("--out", type=Path, required=True, help="the signed policy file")
    pp = polsub.add_parser("publish", help="publish a signed policy, retained")
    pp.add_argument("--policy", type=Path, required=True, help="from `edge-fleet policy sign`")
    add_broker_options(pp)
    pp.add_argument(
        "--installed",
        type=Path,
        metavar="FILE",
        help="the policy installed on the cars, when the broker retains none yet",
    )
    reg = sub.add_parser("register", help="record a vehicle's public key")
    reg.add_argument(
        "--registry", type=Path, required=True, help="the fleet's vehicles.json (made if absent)"
    )
    reg.add_argument("--vehicle-id", required=True, help="as in the car's config")
    reg.add_argument(
        "--public-key", required=True, metavar="B64", help="from `edge-agent pubkey` on the car"
    )
    sb = sub.add_parser("submit", help="queue digit jobs")
    sb.add_argument(
        "--queue", required=True, help="a SQLite file (made if absent) or a postgresql:// URL"
    )
    sb.add_argument(
        "--requester-key", type=Path, required=True, help="whose key the results are sealed to"
    )
    sb.add_argument("--count", type=positive_int, default=10, help="jobs to queue (default 10)")
    sb.add_argument(
        "--expires-in",
        type=positive_float,
        default=24 * 3600.0,
        metavar="SECONDS",
        help="how long a job may wait for a car (preemptions and hand-backs requeue it until "
        "then; default one day)",
    )
    sb.add_argument(
        "--models", type=Path, default=MODELS, help="the models folder (default: the shipped one)"
    )
    pv = sub.add_parser("provision", help="create the fleet's certificates")
    pv.add_argument(
        "--dir", type=Path, required=True, help="the PKI folder (the CA is made on first use)"
    )
    pv.add_argument(
        "--vehicle",
        action="append",
        default=[],
        metavar="ID",
        help="issue a certificate for this vehicle (repeat)",
    )
    pv.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name or address the broker's certificate must carry",
    )
    sv = sub.add_parser("serve", help="run the dispatcher and collector")
    sv.add_argument(
        "--queue", required=True, help="the queue: a SQLite file, or a postgresql:// URL"
    )
    sv.add_argument("--job-key", type=Path, required=True, help="signs the jobs handed out")
    sv.add_argument("--requester-key", type=Path, required=True, help="opens the sealed results")
    sv.add_argument(
        "--registry", type=Path, required=True, help="vehicles.json: whose results to accept"
    )
    add_broker_options(sv)
    sv.add_argument(
        "--max-failures",
        type=positive_int,
        default=3,
        metavar="N",
        help="fail a job for good after N failed attempts (failed or rejected by a car, or a "
        "lease that ran out); preemptions and hand-backs never count (default 3)",
    )
    sv.add_argument(
        "--lease-s",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="how long a car holds a job without a heartbeat before it goes to another",
    )
    operate.add_serve_options(sv)
    operate.add_commands(sub)
    return p


def _keygen(args: argparse.Namespace) -> int:
    if args.job_key is None and args.requester_key is None and args.root_key is None:
        print(
            "say --job-key PATH (with --trusted-out PATH), --requester-key PATH or --root-key PATH",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    try:
        if args.root_key is not None:
            root = Ed25519PrivateKey.generate()
            write_private_key(args.root_key, root)
            print(f"wrote {args.root_key} (key id {key_id(root.public_key())}); keep it offline")
        if args.job_key is not None:
            if args.trusted_out is None:
                print(
                    "--job-key needs --trusted-out PATH for the vehicles' trusted keys file",
                    file=sys.stderr,
                )
                return ExitCode.USAGE
            key = Ed25519PrivateKey.generate()
            write_private_key(args.job_key, key)
            args.trusted_out.write_bytes(KeyRing.of(key.public_key()).to_file())
            print(f"wrote {args.job_key} and {args.trusted_out} (give the latter to vehicles)")
        if args.requester_key is not None:
            rkey = X25519PrivateKey.generate()
            write_private_key(args.requester_key, rkey)
            print(f"wrote {args.requester_key}; public key {public_b64(rkey.public_key())}")
    except FileExistsError as exc:
        print(f"{exc.filename} exists; refusing to overwrite a key", file=sys.stderr)
        return ExitCode.KEY_EXISTS
    return ExitCode.OK


def _policy_sign(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from agent.wire.policy import load_root_policy
    from broker.policy import DAY_S, make_policy, signed_policy

    roots = [load_signing_key(p) for p in args.root_key]
    old_roots = [load_signing_key(p) for p in args.also_sign_with]
    try:
        policy = make_policy(
            version=args.version,
            roots=[k.public_key() for k in roots],
            threshold=args.threshold,
            job_keys=[load_signing_key(p).public_key() for p in args.job_key],
            requesters=[load_requester_key(p).public_key() for p in args.requester_key],
            valid_s=args.valid_days * DAY_S,
            job_classes=tuple(args.job_class),
        )
    except ValidationError as exc:
        problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        print(f"no policy written: {problems}", file=sys.stderr)
        return ExitCode.USAGE
    raw = signed_policy(policy, roots + old_roots)
    load_root_policy(raw)  # what a vehicle installing it will check first
    args.out.write_bytes(raw)
    print(
        f"wrote {args.out}: policy v{policy.version}, {len(policy.job_keys)} job key(s), "
        f"{len(policy.requester_keys)} requester(s), expires in {args.valid_days:g} days"
    )
    return ExitCode.OK


async def _policy_publish(args: argparse.Namespace) -> int:
    from agent.wire.policy import accept_policy, load_root_policy
    from broker.policy import publish_policy, retained_policy

    access = access_from_args(args)
    raw = args.policy.read_bytes()
    policy = load_root_policy(raw)  # never publish something no vehicle would take
    import aiomqtt

    try:
        # The cars hold the retained policy (or the installed one, --installed): a new one
        # must pass the rules they apply, or it would replace a good policy with one every
        # car refuses.
        anchors = [("installed", args.installed.read_bytes())] if args.installed else []
        held = await retained_policy(
            host=access.host, port=access.port, tls=access.tls, login=access.login()
        )
        if held is not None:
            try:
                load_root_policy(held)
            except WireError as exc:  # every car refuses it too: it anchors nothing
                print(f"the retained message is no valid policy ({exc.detail}); replacing it")
            else:
                anchors.append(("retained on the broker", held))
        for where, anchor in anchors:
            current = load_root_policy(anchor)
            if current.version == policy.version and anchor == raw:
                continue
            try:
                accept_policy(raw, current, time.time())
            except WireError as exc:
                print(
                    f"not published: the cars hold policy v{current.version} ({where}), and "
                    f"they would refuse this one: {exc.detail}. Sign it with the current "
                    "roots (edge-fleet policy sign --root-key ... --also-sign-with ...) and "
                    "a higher --version",
                    file=sys.stderr,
                )
                return ExitCode.CONFIG
        await publish_policy(
            raw, host=access.host, port=access.port, tls=access.tls, login=access.login()
        )
    except aiomqtt.MqttError as exc:
        print(f"not published: broker {access.where}: {broker_said(exc)}", file=sys.stderr)
        return ExitCode.UNAVAILABLE
    print(f"published policy v{policy.version} on {args.host}:{args.port} (retained)")
    return ExitCode.OK


def _register(args: argparse.Namespace) -> int:
    import base64
    import binascii

    try:
        check_vehicle_id(args.vehicle_id)
    except ValueError as exc:
        print(f"not registered: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        raw = base64.b64decode(args.public_key.strip(), validate=True)
        ed25519_public(raw)
    except (ValueError, binascii.Error):
        print(
            f"not registered: --public-key {args.public_key.strip()[:60]!r} is not an Ed25519 "
            "public key in base64 (44 characters ending in '='); print the vehicle's with "
            "`edge-agent pubkey /etc/edge-agent/credentials/vehicle.key`",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    entries: dict[str, VehicleKey] = {}
    if args.registry.exists():
        try:
            current = parse_model(
                args.registry.read_bytes(),
                VehicleRegistryFile,
                what="registry",
                reason=Reason.MALFORMED_PAYLOAD,
            )
        except WireError as exc:
            print(f"{args.registry}: {exc.detail}", file=sys.stderr)
            return ExitCode.CONFIG
        entries = {v.vehicle_id: v for v in current.vehicles}
    entries[args.vehicle_id] = VehicleKey(vehicle_id=args.vehicle_id, public_key=raw)
    args.registry.write_bytes(
        dump_model(VehicleRegistryFile(version=1, vehicles=tuple(entries.values())))
    )
    print(f"registered {args.vehicle_id} in {args.registry}")
    return ExitCode.OK


def _provision(args: argparse.Namespace) -> int:
    from broker.provision import ProvisionError, provision

    try:
        pki = provision(args.dir, args.vehicle, tuple(args.host))
    except ProvisionError as exc:
        print(f"nothing provisioned: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    print(f"fleet CA {pki.ca}; broker {pki.broker.cert}; fleet tools {pki.fleet.cert}")
    for vid in args.vehicle:
        print(f"vehicle {vid}: {pki.vehicle(vid).cert} and {pki.vehicle(vid).key} (0600)")
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from broker.demo import main as demo_main

        logs.configure(json=False, level=logging.WARNING)
        external = None
        if args.host is not None or args.port is not None:
            tls = args.pki is not None or args.ca_file is not None
            args.host = args.host or "127.0.0.1"
            args.port = args.port or (8883 if tls else 1883)
            try:
                external = access_from_args(args)
            except AccessError as exc:
                print(f"edge-fleet demo: {exc}", file=sys.stderr)
                return ExitCode.USAGE
        return demo_main(
            jobs=args.jobs,
            out=args.report,
            workdir=args.workdir,
            secure=not args.plaintext,
            external=external,
        )
    logs.configure(json=False)
    try:
        if args.command == "keygen":
            return _keygen(args)
        if args.command == "register":
            return _register(args)
        if args.command == "jobs":
            return asyncio.run(commands.jobs(args))
        if args.command == "submit":
            return asyncio.run(commands.submit(args))
        if args.command in operate.COMMANDS:
            return operate.run(args)
        if args.command == "provision":
            return _provision(args)
        if args.command == "serve":
            return asyncio.run(commands.serve(args))
        if args.command == "policy" and args.policy_command == "sign":
            return _policy_sign(args)
        if args.command == "policy":
            return asyncio.run(_policy_publish(args))
        if args.command == "broker":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            return commands.run_broker(args)
    except AccessError as exc:
        print(f"edge-fleet {args.command}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except (KeyFileError, WireError, OSError, commands.QueueError) as exc:
        print(f"edge-fleet {args.command}: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    return ExitCode.USAGE


if __name__ == "__main__":
    sys.exit(main())
