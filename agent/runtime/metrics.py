"""Prometheus metrics on a localhost port (prometheus-client), one registry per agent.

With the endpoint off (`agent.metrics_port = 0`, the default) every instrument is a
null one and prometheus-client is never imported: it and the HTTP server modules it
pulls in cost 1.6 MB of the daemon's memory while the car drives, for numbers
nobody reads on a car without a local Prometheus (docs/performance.md, idle footprint).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.core.gate import GateReason

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class _Off:
    """The null instrument: takes every update, records nothing."""

    def labels(self, *values: str, **labels: str) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


OFF = _Off()


class AgentMetrics:
    """The agent's instruments: real ones when `enabled`, the null one otherwise."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry: CollectorRegistry | None = None
        self.gate_open: Gauge | _Off = OFF
        self.gate_reason: Gauge | _Off = OFF
        self.jobs: Counter | _Off = OFF
        self.job_seconds: Histogram | _Off = OFF
        self.energy_today: Gauge | _Off = OFF
        self.outbox: Gauge | _Off = OFF
        self.reconnects: Counter | _Off = OFF
        self.compute_power: Gauge | _Off = OFF
        self.compute_temp: Gauge | _Off = OFF
        self.policies: Counter | _Off = OFF
        self.policy_version: Gauge | _Off = OFF
        self.inbound_dropped: Counter | _Off = OFF
        self.oversized_packets: Counter | _Off = OFF
        self.state_write_failures: Counter | _Off = OFF
        self.duty: Gauge | _Off = OFF
        self.connected: Gauge | _Off = OFF
        self.broker_refusals: Counter | _Off = OFF
        if enabled:
            self._build()

    def _build(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.gate_open = Gauge("edge_agent_gate_open", "1 while the car may compute", registry=r)
        self.gate_reason = Gauge(
            "edge_agent_gate_reason", "1 for each reason the gate is closed", ["reason"], registry=r
        )
        self.jobs = Counter(
            "edge_agent_jobs", "Job events by kind and reason", ["kind", "reason"], registry=r
        )
        self.job_seconds = Histogram(
            "edge_agent_job_seconds",
            "Run time of succeeded jobs",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600),
            registry=r,
        )
        self.energy_today = Gauge(
            "edge_agent_energy_today_wh", "Energy lent today (owner's day)", registry=r
        )
        self.outbox = Gauge(
            "edge_agent_outbox_results", "Sealed results waiting for the broker", registry=r
        )
        self.reconnects = Counter("edge_agent_reconnects", "MQTT reconnection attempts", registry=r)
        self.compute_power = Gauge("edge_agent_compute_power_w", "Compute module power", registry=r)
        self.compute_temp = Gauge(
            "edge_agent_compute_temp_c", "Compute module temperature", registry=r
        )
        self.policies = Counter(
            "edge_agent_trust_policies",
            "Trust policies received: accepted, or the reason refused",
            ["outcome"],
            registry=r,
        )
        self.policy_version = Gauge(
            "edge_agent_trust_policy_version", "Version of the trust policy held", registry=r
        )
        self.inbound_dropped = Counter(
            "edge_agent_inbound_dropped",
            "MQTT messages dropped because the inbound queue was full (a flood)",
            registry=r,
        )
        self.oversized_packets = Counter(
            "edge_agent_oversized_packets",
            "Connections dropped because the broker announced a packet over the agent's limit",
            registry=r,
        )
        self.state_write_failures = Counter(
            "edge_agent_state_write_failures",
            "Writes to the state disk that failed (full or failing disk)",
            registry=r,
        )
        self.broker_refusals = Counter(
            "edge_agent_broker_refusals",
            "Connections the broker refused for good (bad login, not authorized, banned, "
            "client id not valid), by reason",
            ["reason"],
            registry=r,
        )
        self.duty = Gauge("edge_agent_duty", "Power governor duty cycle", registry=r)
        self.connected = Gauge(
            "edge_agent_broker_connected", "1 while connected to the broker", registry=r
        )
        from prometheus_client import Info, ProcessCollector

        from agent import __version__

        Info("edge_agent_build", "The agent's version", registry=r).info({"version": __version__})
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, fds
        for reason in GateReason:
            self.gate_reason.labels(reason=reason.value).set(0)

    def gate(self, open_: bool, reasons: list[str]) -> None:
        self.gate_open.set(1 if open_ else 0)
        for reason in GateReason:
            self.gate_reason.labels(reason=reason.value).set(1 if reason.value in reasons else 0)

    def serve(self, port: int) -> None:
        """Serve /metrics on 127.0.0.1:`port` (a daemon thread of prometheus-client's)."""
        if self.registry is None:
            raise RuntimeError("metrics are off: build AgentMetrics(enabled=True) to serve them")
        import threading
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        from prometheus_client import make_wsgi_app
        from prometheus_client.exposition import ThreadingWSGIServer

        metrics = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            if environ.get("PATH_INFO") != "/metrics":
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"not found: the metrics are at /metrics\n"]
            return metrics(environ, start_response)

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = make_server(
            "127.0.0.1", port, app, server_class=ThreadingWSGIServer, handler_class=Quiet
        )
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
