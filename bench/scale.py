"""`make scale`: 1,000 simulated cars, 3 fleet replicas, PostgreSQL and Mosquitto on this machine.

Everything is a real process on loopback: mosquitto (persistence on), a private PostgreSQL
cluster, three `edge-fleet serve` replicas (the installed command, as an operator runs
it) and the simulator's cars in two processes (broker/sim: real MQTT connections, the real
wire, simulated compute, gates from the shipped scenarios in real time). Ground truth comes
from outside the fleet nodes: the store's tables (when each job was submitted, leased,
answered), the cars' own message counts, and /proc for the broker's and the store's CPU.

Phases, one run:
  1. connect   all cars connect; they ask once, are told "no work", and go quiet.
  2. backlog   BACKLOG jobs queued at once: leases/s and results/s, sustained.
  3. paced     jobs submitted at a steady rate below capacity: submit-to-result latency.
  4. idle      the queue empty for IDLE_S: what idle, closed and working cars send.
  5. trickle   one job every 0.5 s to quiet cars: how fast new work is picked up.
Then the backlog and paced phases again with one replica on the SQLite store, beside it.

Writes bench/results/scale.json and bench/results/scale.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.kit.keyfiles import write_private_key
from agent.wire.keys import KeyRing
from bench.common import RESULTS, SCENARIOS, percentile, write_result
from broker.commands import digit_templates
from broker.local import LocalMosquitto
from broker.local_postgres import LocalPostgres
from broker.shipped import MODELS
from broker.sim import car as sim_car
from broker.sim import fleet as sim_fleet
from broker.store import JobStore, open_store

EDGE_FLEET = str(Path(sys.executable).parent / "edge-fleet")


class Rig:
    def __init__(self, work: Path, vehicles: int, processes: int, compute_ms: float) -> None:
        self.work = work
        self.vehicles = vehicles
        self.processes = processes
        self.compute_ms = compute_ms
        job, requester = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
        self.job_key = job
        write_private_key(work / "job.key", job)
        write_private_key(work / "requester.key", requester)
        self.ids = sim_car.vehicle_ids("car", vehicles)
        (work / "registry.json").write_bytes(sim_car.registry("scale", self.ids))
        self.templates = digit_templates(MODELS, work / "requester.key", 64)
        self.nodes: list[subprocess.Popen[bytes]] = []
        self.cars: list[multiprocessing.process.BaseProcess] = []

    def serve(self, broker: LocalMosquitto, queue: str, node: str) -> None:
        log = (self.work / f"{node}.log").open("wb")
        self.nodes.append(
            subprocess.Popen(
                [
                    EDGE_FLEET,
                    "serve",
                    "--queue",
                    queue,
                    "--job-key",
                    str(self.work / "job.key"),
                    "--requester-key",
                    str(self.work / "requester.key"),
                    "--registry",
                    str(self.work / "registry.json"),
                    "--port",
                    str(broker.port),
                    "--node",
                    node,
                    "--lease-s",
                    "60",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )

    def start_cars(self, broker: LocalMosquitto, tag: str) -> list[Path]:
        settings = sim_car.Settings(
            host="127.0.0.1",
            port=broker.port,
            trusted_keys=KeyRing.of(self.job_key.public_key()).to_file(),
            seed="scale",
            compute_s=self.compute_ms / 1000.0,
            capacity=1,
            time_scale=1.0,
            model=sim_fleet.digits_model(),
        )
        ctx = multiprocessing.get_context("spawn")
        outs, flags = [], []
        for k in range(self.processes):
            out = self.work / f"meter-{tag}-{k}.json"
            flag = self.work / f"ready-{tag}-{k}"
            p = ctx.Process(
                target=sim_fleet._child,
                args=(self.ids[k :: self.processes], settings, SCENARIOS, 0, out, flag),
            )
            p.start()
            self.cars.append(p)
            outs.append(out)
            flags.append(flag)
        deadline = time.monotonic() + 180
        while not all(f.exists() for f in flags) and time.monotonic() < deadline:
            time.sleep(0.2)
        return outs

    def stop(self) -> dict[str, int]:
        """Stop the cars, then the nodes; what the nodes say they accepted, summed."""
        for p in self.cars:
            p.terminate()
        for p in self.cars:
            p.join(timeout=20)
        self.cars = []
        accepted = Counter[str]()
        for node in self.nodes:
            node.send_signal(signal.SIGTERM)
        for node in self.nodes:
            node.wait(timeout=30)
        for log in self.work.glob("*.log"):
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith('{"node"'):
                    said = json.loads(line)
                    accepted["results"] += said["results"]
                    accepted["duplicates"] += said["duplicates"]
            log.unlink()
        self.nodes = []
        return dict(accepted)


def meter(outs: list[Path]) -> sim_car.Meter:
    total = sim_car.Meter()
    for out in outs:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            total.merge(json.loads(out.read_text()))
    return total


def per_min(before: sim_car.Meter, after: sim_car.Meter) -> dict[str, float | None]:
    rates: dict[str, float | None] = {}
    for phase in sim_car.PHASES:
        msgs = sum(after.msgs[f"{phase}:{d}"] - before.msgs[f"{phase}:{d}"] for d in ("in", "out"))
        minutes = (after.seconds.get(phase, 0.0) - before.seconds.get(phase, 0.0)) / 60.0
        rates[phase] = round(msgs / minutes, 3) if minutes > 1 else None
    return rates


class Cpu:
    """CPU seconds of a process (and its children) between two readings, from /proc."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)

    def seconds(self) -> float:
        total = 0.0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total


async def submit(store: JobStore, templates: list[Any], n: int) -> None:
    for i in range(n):
        await store.submit(templates[i % len(templates)], now=time.time())


async def submit_paced(store: JobStore, templates: list[Any], rate: float, seconds: float) -> int:
    start, n = time.monotonic(), 0
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * rate)
        while n < due:
            await store.submit(templates[n % len(templates)], now=time.time())
            n += 1
        await asyncio.sleep(0.01)
    return n


async def wait_done(store: JobStore, total: int, timeout_s: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = await store.counts()
        if counts.get("done", 0) + counts.get("failed", 0) >= total:
            return counts
        await asyncio.sleep(0.5)
    return await store.counts()


async def rows(store: JobStore, sql: str, since: float = 0.0) -> list[tuple[Any, ...]]:
    """Read the store's tables directly (both engines take the same SQL here); `SINCE` in
    `sql` is the one parameter."""
    from broker.store.postgres import PostgresStore
    from broker.store.sqlite import SqliteStore

    params = (since,) if "SINCE" in sql else ()
    if isinstance(store, PostgresStore):
        return await store._rows(sql.replace("SINCE", "%s"), params)
    assert isinstance(store, SqliteStore)
    with store.queue._lock:
        return list(store.queue._db.execute(sql.replace("SINCE", "?"), params).fetchall())


def sustained_rate(times: list[float]) -> tuple[float, list[int]]:
    """Per-second counts over the run; the median of the middle 80 % of the busy seconds."""
    if not times:
        return 0.0, []
    t0 = min(times)
    per_s = Counter(int(t - t0) for t in times)
    series = [per_s.get(i, 0) for i in range(max(per_s) + 1)]
    cut = len(series) // 10
    middle = sorted(series[cut : len(series) - cut] or series)
    return float(middle[len(middle) // 2]), series


async def measure_work(
    store: JobStore, rig: Rig, backlog: int, paced_rate: float, paced_s: float
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t0 = time.time()
    await submit(store, rig.templates, backlog)
    counts = await wait_done(store, backlog, timeout_s=600)
    backlog_s = time.time() - t0
    leased = [
        r[0]
        for r in await rows(store, "SELECT sent_at FROM assignments WHERE sent_at >= SINCE", t0)
    ]
    answered = [
        r[0]
        for r in await rows(store, "SELECT accepted_at FROM results WHERE accepted_at >= SINCE", t0)
    ]
    out["backlog"] = {"jobs": backlog, "seconds": round(backlog_s, 1), "counts": counts}
    out["leases_per_s"], out["leases_series"] = sustained_rate(leased)
    out["results_per_s"], out["results_series"] = sustained_rate(answered)
    # Paced: below capacity, so latency is the system's, not the backlog's queueing.
    t1 = time.time()
    n = await submit_paced(store, rig.templates, paced_rate, paced_s)
    await wait_done(store, backlog + n, timeout_s=300)
    lat = await rows(
        store,
        "SELECT r.accepted_at - j.submitted_at FROM results r JOIN jobs j USING (job_id) "
        "WHERE j.submitted_at >= SINCE",
        t1,
    )
    latencies = sorted(float(v) for (v,) in lat)
    out["paced"] = {"rate_per_s": paced_rate, "jobs": n, "answered": len(latencies)}
    out["job_latency_p50_s"] = round(percentile(latencies, 0.5), 3) if latencies else None
    out["job_latency_p99_s"] = round(percentile(latencies, 0.99), 3) if latencies else None
    out["latency_series"] = [round(v, 3) for v in latencies]
    out["jobs"] = backlog + n
    return out


async def postgres_run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    with LocalMosquitto(work / "mq", persistence=True) as broker, LocalPostgres() as pg:
        dsn = pg.create_database("fleet")
        store = await open_store(dsn)
        rig = Rig(work, args.vehicles, args.processes, args.compute_ms)
        for k in range(3):
            rig.serve(broker, dsn, f"n{k}")
        broker_cpu, store_cpu = Cpu(broker._proc.pid), Cpu(pg.pid)  # type: ignore[union-attr]
        outs = rig.start_cars(broker, "pg")
        await asyncio.sleep(10)  # every car has asked once and been told "no work"
        connected = meter(outs)
        nodes_cpu = [Cpu(n.pid) for n in rig.nodes]
        cars_cpu = [Cpu(c.pid) for c in rig.cars if c.pid is not None]
        b0, s0, w0 = broker_cpu.seconds(), store_cpu.seconds(), time.monotonic()
        n0 = sum(c.seconds() for c in nodes_cpu)
        c0 = sum(c.seconds() for c in cars_cpu)
        m0 = meter(outs)
        work_out = await measure_work(store, rig, args.backlog, args.paced_rate, args.paced_s)
        wall = time.monotonic() - w0
        m1 = meter(outs)
        out: dict[str, Any] = {
            "vehicles": args.vehicles,
            "connected_peak": connected.connected_peak,
            **work_out,
            "broker_cpu_pct": round(100 * (broker_cpu.seconds() - b0) / wall, 1),
            "fleet_nodes_cpu_pct": round(
                100 * (sum(c.seconds() for c in nodes_cpu) - n0) / wall, 1
            ),
            "simulated_cars_cpu_pct": round(
                100 * (sum(c.seconds() for c in cars_cpu) - c0) / wall, 1
            ),
            "working_wall_s": round(wall, 1),
            "car_msgs_per_job": round(sum(m1.msgs.values()) - sum(m0.msgs.values()), 1)
            / max(1, work_out["jobs"]),
            "store_cpu_pct": round(100 * (store_cpu.seconds() - s0) / wall, 1),
            "broker_rss_mb": round(psutil.Process(broker._proc.pid).memory_info().rss / 2**20, 1),  # type: ignore[union-attr]
            "msgs_per_vehicle_per_min_working_phase": per_min(m0, m1),
        }
        # Idle: nothing queued. The first 60 s settle (cars finishing, told "no work").
        await asyncio.sleep(60)
        i0 = meter(outs)
        await asyncio.sleep(args.idle_s)
        i1 = meter(outs)
        idle = per_min(i0, i1)
        out["idle_window_s"] = args.idle_s
        out["msgs_per_vehicle_per_min"] = {
            "gate_closed": idle["closed"],
            "gate_open_idle": idle["idle"],
            "working": out["msgs_per_vehicle_per_min_working_phase"]["working"],
        }
        out["idle_msgs_per_vehicle_per_min"] = idle["idle"]
        # Trickle: new work to quiet cars.
        t2 = time.time()
        for _ in range(args.trickle):
            await store.submit(rig.templates[0], now=time.time())
            await asyncio.sleep(0.5)
        total = out["jobs"] + args.trickle
        final = await wait_done(store, total, timeout_s=120)
        pickup = sorted(
            float(v)
            for (v,) in await rows(
                store,
                "SELECT MIN(a.sent_at) - j.submitted_at FROM assignments a JOIN jobs j "
                "USING (job_id) WHERE j.submitted_at >= SINCE GROUP BY j.job_id, j.submitted_at",
                t2,
            )
        )
        out["work_pickup_p50_s"] = round(percentile(pickup, 0.5), 3) if pickup else None
        out["work_pickup_p99_s"] = round(percentile(pickup, 0.99), 3) if pickup else None
        out["jobs"] = total
        out["final_counts"] = final
        said = rig.stop()
        results = await rows(store, "SELECT COUNT(*), COUNT(DISTINCT job_id) FROM results")
        (n_results, n_distinct) = results[0]
        out["results_accepted"] = int(n_distinct)
        out["lost_results"] = total - int(final.get("done", 0))
        out["duplicate_results_accepted"] = (
            int(n_results) - int(n_distinct) + max(0, said.get("results", 0) - int(n_distinct))
        )
        out["nodes_said"] = said
        out["car_events"] = dict(meter(outs).events)
        await store.close()
        return out


async def sqlite_run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    with LocalMosquitto(work / "mq-sqlite", persistence=True) as broker:
        queue = str(work / "queue.db")
        store = await open_store(queue)
        rig = Rig(work, args.vehicles, args.processes, args.compute_ms)
        rig.serve(broker, queue, "solo")
        outs = rig.start_cars(broker, "sqlite")
        await asyncio.sleep(10)
        out = await measure_work(store, rig, args.backlog, args.paced_rate, args.paced_s)
        out["connected_peak"] = meter(outs).connected_peak
        final = await store.counts()
        rig.stop()
        out["lost_results"] = out["jobs"] - final.get("done", 0)
        out["replicas"] = 1
        await store.close()
        return out


def plot(pg: dict[str, Any], lite: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7))
    for data, name in ((pg, "PostgreSQL, 3 replicas"), (lite, "SQLite, 1 node")):
        top.plot(data["leases_series"], label=f"leases/s, {name}")
        top.plot(data["results_series"], linestyle="--", label=f"results/s, {name}")
        bottom.plot(sorted(data["latency_series"]), label=name)
    top.set_xlabel("seconds into the backlog phase")
    top.set_ylabel("per second")
    top.legend(fontsize=8)
    bottom.set_xlabel("jobs of the paced phase, by latency")
    bottom.set_ylabel("submit to accepted result (s)")
    bottom.legend(fontsize=8)
    fig.suptitle(f"{pg['vehicles']} simulated cars, one 2-core machine")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vehicles", type=int, default=1000)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--compute-ms", type=float, default=200.0)
    p.add_argument("--backlog", type=int, default=30000)
    p.add_argument("--paced-rate", type=float, default=250.0)
    p.add_argument("--paced-s", type=float, default=60.0)
    p.add_argument("--idle-s", type=float, default=900.0)
    p.add_argument("--trickle", type=int, default=120)
    p.add_argument("--skip-sqlite", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-scale-") as tmp:
        work = Path(tmp)
        (work / "pg").mkdir()
        pg = asyncio.run(postgres_run(args, work / "pg"))
        lite: dict[str, Any] = {}
        if not args.skip_sqlite:
            (work / "lite").mkdir()
            lite = asyncio.run(sqlite_run(args, work / "lite"))
    targets = {
        "connected_1000": pg["connected_peak"] >= 1000,
        "lost_results_0": pg["lost_results"] == 0,
        "duplicate_results_accepted_0": pg["duplicate_results_accepted"] == 0,
        "leases_per_s_500": pg["leases_per_s"] >= 500,
        "idle_msgs_per_vehicle_per_min_0.2": (pg["idle_msgs_per_vehicle_per_min"] or 0) <= 0.2,
        "work_pickup_p99_s_5": (pg["work_pickup_p99_s"] or 1e9) <= 5,
    }
    result = {
        **{k: v for k, v in pg.items() if not k.endswith("_series")},
        "store": "postgresql",
        "replicas": 3,
        "settings": vars(args),
        "targets_met": targets,
        "sqlite": {k: v for k, v in lite.items() if not k.endswith("_series")},
    }
    path = write_result("scale", result)
    if lite:
        plot(pg, lite, RESULTS / "scale.png")
    print(json.dumps({k: result[k] for k in result if k not in ("sqlite", "settings")}, indent=1))
    print(f"wrote {path}")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
