"""Many simulated cars: keys, the registry, processes, and what they measured."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path

from agent.kit.exitcodes import ExitCode
from agent.vehicle.scenario import Scenario, load_scenario
from agent.wire.keys import (
    KeyRing,
)
from agent.wire.messages import (
    ModelHeld,
)
from broker.access import BrokerAccess
from broker.sim.car import (
    PHASES,
    Meter,
    Settings,
    SimVehicle,
    registry,
    vehicle_ids,
)


def _scenarios(folder: Path) -> list[Scenario]:
    files = sorted(folder.glob("*.toml")) if folder.is_dir() else [folder]
    if not files:
        raise ValueError(f"no scenario files (*.toml) in {folder}")
    return [load_scenario(f) for f in files]


async def run_vehicles(
    ids: list[str],
    settings: Settings,
    scenarios: list[Scenario],
    duration_s: float,
    *,
    ready: Callable[[], None] | None = None,
    snapshot: Callable[[Meter], None] | None = None,
    snapshot_every_s: float = 2.0,
) -> Meter:
    """Run these cars for `duration_s` (forever if 0); the meter says what they did, and
    `snapshot` gets it every `snapshot_every_s` on the way."""
    meter = Meter()
    cars = [
        SimVehicle(v, settings, scenarios[i % len(scenarios)], meter) for i, v in enumerate(ids)
    ]
    tasks = []
    for car in cars:
        tasks.append(asyncio.create_task(car.run(), name=f"sim-{car.id}"))
        await asyncio.sleep(0.002)  # connect at about 500/s, as a fleet coming online would
    if ready is not None:
        deadline = time.monotonic() + 60
        while meter.connected < len(cars) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        ready()
    until = time.monotonic() + (duration_s if duration_s > 0 else float("inf"))
    try:
        while (left := until - time.monotonic()) > 0:
            await asyncio.sleep(min(left, snapshot_every_s))
            if snapshot is not None:
                for car in cars:
                    car.close_books()
                snapshot(meter)
    finally:
        for car in cars:
            car.close_books()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return meter


def _child(
    ids: list[str],
    settings: Settings,
    folder: Path,
    duration_s: float,
    out: Path,
    ready: Path | None,
) -> None:
    """One process's share of the cars; its meter goes to `out` every 2 s and at the end."""

    def write(meter: Meter) -> None:
        part = out.with_suffix(".part")
        part.write_text(json.dumps(meter.as_dict()))
        part.replace(out)

    scenarios = _scenarios(folder)
    meter = asyncio.run(
        run_vehicles(
            ids,
            settings,
            scenarios,
            duration_s,
            ready=(lambda: ready.touch()) if ready else None,
            snapshot=write,
        )
    )
    write(meter)


def digits_model() -> ModelHeld:
    from broker.shipped import MODELS

    manifest = json.loads((MODELS / "manifest.json").read_text())
    digits = next(m for m in manifest["models"] if m["name"] == "digits")
    return ModelHeld(name="digits", sha256=digits["sha256"])


def summarize(meter: Meter) -> dict[str, object]:
    per_min: dict[str, float | None] = {}
    for phase in PHASES:
        msgs = meter.msgs[f"{phase}:out"] + meter.msgs[f"{phase}:in"]
        minutes = meter.seconds.get(phase, 0.0) / 60.0
        per_min[phase] = round(msgs / minutes, 3) if minutes > 0 else None
    return {
        "connected_peak": meter.connected_peak,
        "msgs_per_vehicle_per_min": per_min,
        "vehicle_minutes": {p: round(meter.seconds.get(p, 0.0) / 60.0, 1) for p in PHASES},
        "messages": dict(meter.msgs),
        "events": dict(meter.events),
    }


def simulate_command(args: argparse.Namespace, access: BrokerAccess) -> int:
    trusted = args.trusted_keys.read_bytes()
    KeyRing.from_file(trusted, str(args.trusted_keys))  # refused here, named, if it is wrong
    ids = vehicle_ids(args.prefix, args.vehicles)
    args.registry_out.write_bytes(registry(args.seed, ids))
    if args.registry_only:
        print(json.dumps({"registry": str(args.registry_out), "vehicles": len(ids)}))
        return ExitCode.OK
    settings = Settings(
        host=args.host,
        port=args.port,
        trusted_keys=trusted,
        seed=args.seed,
        compute_s=args.compute_ms / 1000.0,
        capacity=args.capacity,
        time_scale=args.time_scale,
        model=digits_model(),
        pki=args.pki,
        ca_file=args.ca_file,
        username=access.username,
        password=login.password if (login := access.login()) else None,
    )
    meter = run_split(ids, settings, args.scenarios, args.duration, args.processes, args.ready_file)
    report = summarize(meter)
    if args.stats_out is not None:
        args.stats_out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return ExitCode.OK


def run_split(
    ids: list[str],
    settings: Settings,
    folder: Path,
    duration_s: float,
    processes: int,
    ready: Path | None = None,
) -> Meter:
    """The cars over `processes` processes (one Python loop carries a few hundred)."""
    import tempfile

    meter = Meter()
    with tempfile.TemporaryDirectory(prefix="edge-sim-") as tmp:
        ctx = multiprocessing.get_context("spawn")
        procs, outs, flags = [], [], []
        for k in range(processes):
            out = Path(tmp) / f"meter-{k}.json"
            flag = Path(tmp) / f"ready-{k}" if ready else None
            p = ctx.Process(
                target=_child, args=(ids[k::processes], settings, folder, duration_s, out, flag)
            )
            p.start()
            procs.append(p)
            outs.append(out)
            flags.append(flag)
        if ready is not None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not all(f.exists() for f in flags if f):
                time.sleep(0.1)
            ready.touch()
        for p in procs:
            p.join()
        for out in outs:
            if out.exists():
                meter.merge(json.loads(out.read_text()))
    return meter
