"""`edge-fleet` commands for running a fleet at scale: serve's replica options, `queue`,
`vehicles` and `simulate`. (The rest of the command line is broker/cli.py.)"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from agent.kit.exitcodes import ExitCode
from broker.access import BrokerAccess, access_from_args, add_broker_options, broker_said
from broker.argtypes import non_negative, positive_int
from broker.shipped import SCENARIOS

COMMANDS = ("queue", "vehicles", "simulate")


def add_serve_options(sv: argparse.ArgumentParser) -> None:
    sv.add_argument(
        "--node",
        default="main",
        metavar="NAME",
        help="this node's name among replicas sharing the queue (its MQTT client id is "
        "fleet-<job key id>-NAME; default main)",
    )
    sv.add_argument(
        "--group",
        default="fleet",
        help="the MQTT 5 shared-subscription group the replicas split the work in (default fleet)",
    )
    sv.add_argument(
        "--session-expiry",
        type=int,
        default=300,
        metavar="SECONDS",
        help="how long the broker keeps this node's messages while it is away (default 300; "
        "0: a clean session, nothing kept)",
    )
    sv.add_argument(
        "--reap-after",
        type=non_negative,
        default=10.0,
        metavar="SECONDS",
        help="end the session of a replica gone this long, so it stops taking its turn "
        "(default 10: longer than a restart)",
    )
    sv.add_argument(
        "--idle-retry",
        type=non_negative,
        default=900.0,
        metavar="SECONDS",
        help="a car that asked and got nothing waits about this long (80-100 %%, jittered) "
        "before asking again, unless woken when work comes (default 900, the most a car "
        "heeds; 0: no hints, cars ask every interval)",
    )
    sv.add_argument(
        "--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on this port"
    )
    sv.add_argument(
        "--metrics-host", default="127.0.0.1", help="the metrics address (default 127.0.0.1)"
    )


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser("queue", help="jobs by state, the oldest lease and the parked cars")
    q.add_argument("--queue", required=True, help="the queue: a SQLite file or a postgresql:// URL")
    q.add_argument("--json", action="store_true", help="one JSON object instead of text")

    v = sub.add_parser("vehicles", help="every car's retained status, as the broker holds it")
    add_broker_options(v)
    v.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    v.add_argument(
        "--wait",
        type=non_negative,
        default=2.0,
        metavar="SECONDS",
        help="how long to collect retained statuses (default 2)",
    )

    s = sub.add_parser(
        "simulate", help="N virtual cars on the real wire, for load tests (not the agent)"
    )
    add_broker_options(s)
    s.add_argument("--vehicles", type=positive_int, required=True, help="how many cars")
    s.add_argument(
        "--trusted-keys", type=Path, required=True, help="the job keys the cars trust (keygen)"
    )
    s.add_argument(
        "--registry-out",
        type=Path,
        required=True,
        help="write the cars' public keys here, for `serve --registry`",
    )
    s.add_argument(
        "--duration",
        type=non_negative,
        default=60.0,
        metavar="SECONDS",
        help="how long the cars run (default 60; 0: until Ctrl-C)",
    )
    s.add_argument(
        "--compute-ms", type=non_negative, default=20.0, help="simulated compute per job"
    )
    s.add_argument("--capacity", type=positive_int, default=1, help="jobs a car holds at once")
    s.add_argument(
        "--scenarios",
        type=Path,
        default=SCENARIOS,
        help="scenario files (*.toml) the cars' gates follow (default: the shipped ones)",
    )
    s.add_argument(
        "--time-scale",
        type=non_negative,
        default=600.0,
        help="scenario seconds per real second (default 600: a day in 2.4 minutes)",
    )
    s.add_argument("--prefix", default="sim", help="vehicle ids are PREFIX-00000...")
    s.add_argument("--seed", default="sim", help="the same seed gives the same car keys")
    s.add_argument(
        "--registry-only",
        action="store_true",
        help="only write the registry (for serve), then exit",
    )
    s.add_argument("--processes", type=positive_int, default=1, help="split the cars over P")
    s.add_argument("--stats-out", type=Path, help="write message counts and timings as JSON")
    s.add_argument("--ready-file", type=Path, help="touch this once every car is connected")


def run(args: argparse.Namespace) -> int:
    if args.command == "queue":
        from broker.commands import queue_summary

        return asyncio.run(queue_summary(args))
    access = access_from_args(args)
    if args.command == "vehicles":
        return asyncio.run(_vehicles(args, access))
    from broker.sim.fleet import simulate_command

    return simulate_command(args, access)


async def _vehicles(args: argparse.Namespace, access: BrokerAccess) -> int:
    import aiomqtt

    from agent.wire.codec import parse_model
    from agent.wire.errors import Reason, WireError
    from agent.wire.messages import VehicleStatus
    from agent.wire.topics import Channel, all_vehicles, parse_topic

    seen: dict[str, dict[str, object]] = {}
    try:
        async with access.client(
            identifier=f"fleet-view-{time.time_ns()}",
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=10,
        ) as client:
            await client.subscribe(all_vehicles(Channel.STATUS), 1)
            deadline = time.monotonic() + args.wait
            with_timeout = asyncio.timeout_at(asyncio.get_running_loop().time() + args.wait)
            try:
                async with with_timeout:
                    async for message in client.messages:
                        where = parse_topic(message.topic.value)
                        if where is None or not isinstance(message.payload, bytes):
                            continue
                        try:
                            status = parse_model(
                                message.payload,
                                VehicleStatus,
                                what="status",
                                reason=Reason.MALFORMED_PAYLOAD,
                            )
                        except WireError as err:
                            seen[where[0]] = {"error": f"{err.reason.value}: {err.detail}"}
                            continue
                        seen[where[0]] = {
                            "connected": status.online,
                            "gate_open": status.gate_open,
                            "reasons": list(status.reasons),
                            "policy_version": status.policy_version,
                            "agent_version": status.agent_version,
                            "last_seen_s": round(time.time() - status.at, 1),
                        }
                        if time.monotonic() > deadline:
                            break
            except TimeoutError:
                pass
    except aiomqtt.MqttError as exc:
        print(
            f"edge-fleet vehicles: cannot reach the broker {access.where}: {broker_said(exc)}",
            file=sys.stderr,
        )
        return ExitCode.UNAVAILABLE
    if args.json:
        print(json.dumps({"vehicles": dict(sorted(seen.items()))}))
        return ExitCode.OK
    print(f"{'vehicle':<24} {'connected':<9} {'gate':<6} {'policy':<6} {'seen':>8}  reasons")
    for vid, row in sorted(seen.items()):
        if "error" in row:
            print(f"{vid:<24} {row['error']}")
            continue
        reasons = row["reasons"]
        assert isinstance(reasons, list)
        print(
            f"{vid:<24} {'yes' if row['connected'] else 'no':<9} "
            f"{'open' if row['gate_open'] else 'closed':<6} {row['policy_version'] or '-'!s:<6} "
            f"{row['last_seen_s']!s:>7}s  {','.join(reasons) or '-'}"
        )
    print(f"{len(seen)} vehicles")
    return ExitCode.OK
