"""The fleet node's Prometheus metrics (`edge-fleet serve --metrics-port`).

Counters are per node: with replicas, sum them across nodes. The queue gauges read the
shared store, so every node reports the same queue.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge

from agent.wire.messages import VehicleStatus
from broker.store.jobs import STATES, QueueSummary


class FleetMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connected = Gauge("edge_fleet_broker_connected", "1 while connected", registry=r)
        self.work_requests = Counter(
            "edge_fleet_work_requests", "Work requests received", registry=r
        )
        self.leases = Counter("edge_fleet_leases", "Jobs leased to vehicles", registry=r)
        self.leases_ended = Counter(
            "edge_fleet_leases_ended",
            "Leases ended without a result, by why",
            ["reason"],
            registry=r,
        )
        self.results = Counter(
            "edge_fleet_results", "Verified results, accepted or duplicate", ["outcome"], registry=r
        )
        self.refused = Counter(
            "edge_fleet_refused",
            "Messages refused, by channel and reason",
            ["channel", "reason"],
            registry=r,
        )
        self.broker_refusals = Counter(
            "edge_fleet_broker_refusals",
            "Connections the broker refused for good (bad login, not authorized, banned), "
            "by reason",
            ["reason"],
            registry=r,
        )
        self.hints = Counter("edge_fleet_work_hints", "Work hints sent", ["kind"], registry=r)
        self.queue = Gauge(
            "edge_fleet_queue_jobs", "Jobs in the store by state", ["state"], registry=r
        )
        self.oldest_lease = Gauge(
            "edge_fleet_oldest_lease_age_seconds", "Age of the oldest current lease", registry=r
        )
        self.parked = Gauge(
            "edge_fleet_parked_vehicles", "Vehicles told 'no work', waiting to be woken", registry=r
        )
        self.vehicles = Gauge(
            "edge_fleet_vehicles", "Vehicles seen, by what their status says", ["state"], registry=r
        )

    def observe_queue(self, summary: QueueSummary, now: float | None = None) -> None:
        for state in STATES:
            self.queue.labels(state=state).set(summary.counts.get(state, 0))
        now = time.time() if now is None else now
        age = 0.0 if summary.oldest_lease_at is None else max(0.0, now - summary.oldest_lease_at)
        self.oldest_lease.set(age)
        self.parked.set(summary.parked_vehicles)

    def observe_vehicles(self, statuses: Iterable[VehicleStatus]) -> None:
        online = gate_open = offline = 0
        for status in statuses:
            online += status.online
            offline += not status.online
            gate_open += status.online and status.gate_open
        self.vehicles.labels(state="online").set(online)
        self.vehicles.labels(state="offline").set(offline)
        self.vehicles.labels(state="gate_open").set(gate_open)
