"""The operator's room: `edge-agent status`, live control of the emulated car, a reload of
the config, and systemd's supervision.

Tasks:
  control-socket      serves `edge-agent status` and `edge-agent vehicle set`
  systemd-supervisor  READY (once connected, or after a few seconds anyway: the agent runs
                      offline too), STATUS, and watchdog pings only while healthy, so
                      systemd restarts a hung agent.
It reads the other rooms (it is handed them) and changes only the config the agent runs
with and the emulated car's state.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from typing import Any

from agent import __version__
from agent.config import AgentConfig
from agent.core.gate import Gate
from agent.core.trust import Trust
from agent.inference.engine import WorkerEngine
from agent.runtime.control import ControlError, serve_control
from agent.runtime.energy import JobEnergy
from agent.runtime.executor import Executor
from agent.runtime.link import Link
from agent.runtime.models import Shelf
from agent.runtime.outbox import Outbox
from agent.runtime.record import Recorder
from agent.runtime.systemd import Notifier
from agent.runtime.watch import Watch
from agent.vehicle.emulated import EmulatedVehicle
from agent.wire.messages import VehicleStatus

READY_AFTER_S = 3.0
RESTART_SECTIONS = ("vehicle", "sensors", "broker", "keys", "models", "state", "agent")


def _iso(at: float | None) -> str | None:
    """A time for people and log tools: ISO 8601 in UTC, to the second."""
    if at is None:
        return None
    return dt.datetime.fromtimestamp(at, dt.UTC).isoformat(timespec="seconds")


def _local_iso(at: dt.datetime | None) -> str | None:
    return at.isoformat(timespec="minutes") if at is not None else None


class Operator:
    def __init__(
        self,
        config: Callable[[], AgentConfig],
        set_config: Callable[[AgentConfig], None],
        *,
        watch: Watch,
        executor: Executor,
        outbox: Outbox,
        energy: JobEnergy,
        shelf: Shelf,
        trust: Trust,
        engine: WorkerEngine,
        recorder: Recorder,
        notifier: Notifier,
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._set_config = set_config
        self.vehicle_id = config().vehicle.id
        self._watch = watch
        self._executor = executor
        self._outbox = outbox
        self._energy = energy
        self._shelf = shelf
        self._trust = trust
        self._engine = engine
        self._rec = recorder
        self._notifier = notifier
        self._clock = clock
        self.link: Link | None = None  # set once built: the link is handed this room's status
        self._ready_sent = False

    @property
    def config(self) -> AgentConfig:
        return self._config()

    @property
    def gate(self) -> Gate:
        return self._watch.gate

    @property
    def _connected(self) -> bool:
        return self.link is not None and self.link.connected

    # ---- what is shown ----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What `edge-agent status` shows: gate and reasons, the car, the job, energy."""
        decision = self.gate.last
        snap = self._watch.last_snapshot
        current = self._executor.current
        held = self._trust.policy
        return {
            "vehicle_id": self.vehicle_id,
            "connected": self._connected,
            "broker": self._broker_status(),
            "gate": {
                "open": bool(decision and decision.open),
                "reasons": [r.value for r in decision.reasons] if decision else ["starting"],
                "next_window_opens": _local_iso(self._watch.next_window(self._clock())),
            },
            "vehicle": None
            if snap is None
            else {
                "gear": snap.gear.value,
                "plugged_in": snap.plugged_in,
                "charging": snap.charging,
                "soc_pct": round(snap.soc_pct, 2),
                "compute_temp_c": round(snap.compute_temp_c, 2),
                "battery_temp_c": round(snap.battery_temp_c, 2),
                "compute_power_w": round(snap.compute_power_w, 2),
                "charge_power_w": round(snap.charge_power_w, 1),
                "sources": snap.sources,
                "faults": list(snap.faults),
            },
            "current_job": None
            if current is None
            else {
                "job_id": current.job_id,
                "attempt": current.attempt,
                "model": current.model.name,
                "energy_wh": round(self._energy.job_wh((current.job_id, current.attempt)), 6),
            },
            "worker": {
                "pid": self._engine.pid,
                "cpu_s": self._engine.cpu_seconds(),
                "computing": self._engine.busy,
                "requests": self._engine.requests,
                "paused": self._engine.paused,
                "providers": list(self._engine.using),
                # After the worker failed to start twice in a row: when work is asked again.
                "unavailable_retry_in_s": max(
                    0.0, round(self._executor.worker_retry_at - time.monotonic(), 1)
                ),
            },
            "scenario": self._scenario_status(),
            "queued_jobs": self._executor.queued,
            "outbox": self._outbox.depth,
            "models": sorted(self._shelf.held),
            "trust_policy_version": held.version if held else None,
            "energy": {
                "day": self._energy.day,
                "today_wh": round(self._energy.today_wh, 6),
                "daily_allowance_wh": self.config.limits.daily_energy_wh,
            },
            "counts": dict(self._rec.counts),
        }

    def _broker_status(self) -> dict[str, Any]:
        b = self.config.broker
        link = self.link
        return {
            "address": f"{b.host}:{b.port}",
            "tls": b.tls,
            "connected_since": _iso(link.connected_at) if link else None,
            "last_error": link.last_error if link else None,
            "last_error_at": _iso(link.last_error_at) if link else None,
        }

    def _emulated(self) -> EmulatedVehicle | None:
        vehicle = self._watch.vehicle
        emulated = getattr(vehicle, "emulated", vehicle)
        return emulated if isinstance(emulated, EmulatedVehicle) else None

    def _scenario_status(self) -> dict[str, Any] | None:
        """Where the emulated car's scenario stands: its time base and its next change."""
        emulated = self._emulated()
        if emulated is None:
            return None
        return {
            "started_at": emulated.started_at,
            "time_scale": emulated.time_scale,
            "next_change_at": emulated.next_change_at(),
        }

    def status_line(self) -> str:
        decision = self.gate.last
        gate = (
            "gate open"
            if decision and decision.open
            else (
                "gate closed: " + ", ".join(r.value for r in decision.reasons)
                if decision
                else "starting"
            )
        )
        link = "connected" if self._connected else "broker unreachable"
        return f"{gate}; {link}; outbox {self._outbox.depth}"

    def status_message(self, online: bool) -> VehicleStatus:
        """What the retained status topic says about this vehicle."""
        decision = self.gate.last
        held = self._trust.policy
        return VehicleStatus(
            vehicle_id=self.vehicle_id,
            online=online,
            gate_open=bool(decision and decision.open) and online,
            reasons=tuple(r.value for r in decision.reasons) if decision else (),
            agent_version=__version__,
            at=self._clock(),
            policy_version=held.version if held else None,
        )

    # ---- what an operator changes --------------------------------------------------

    def set_vehicle(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Live control of the emulated car (rigs, demos). ValueError if not possible."""
        emulated = self._emulated()
        if emulated is None:
            raise ValueError("this vehicle has no emulated state to set")
        state = emulated.set(self._clock(), **fields)
        self._watch.observe(self._clock())
        return state.model_dump(mode="json")

    def reload(self, new: AgentConfig) -> list[str]:
        """Apply a reloaded config. Returns the sections that need a restart to take effect."""
        old = self.config
        restart = [name for name in RESTART_SECTIONS if getattr(new, name) != getattr(old, name)]
        self._set_config(old.model_copy(update={"owner": new.owner, "limits": new.limits}))
        self._watch.reconfigure(self.config)
        if self._shelf.changed_on_disk():  # a model was installed
            self._shelf.refresh_soon()
        self._rec.log("info", "config_reloaded", restart_needed_for=restart or None)
        self._watch.observe(self._clock())
        if self.link is not None:
            self.link.status_changed()
        return restart

    # ---- supervision -------------------------------------------------------------------

    def ready(self) -> None:
        """READY=1, once (connected, or after READY_AFTER_S anyway)."""
        if not self._ready_sent:
            self._ready_sent = self._notifier.ready(self.status_line()) or True

    def healthy(self, loop_lag_s: float, limit_s: float) -> bool:
        """The event loop keeps time and a running job still has its worker."""
        if loop_lag_s > limit_s:
            return False
        return not (
            self._executor.current is not None and self._engine.busy and self._engine.pid is None
        )

    async def supervise(self) -> None:
        """The `systemd-supervisor` task."""
        await asyncio.sleep(READY_AFTER_S)
        self.ready()
        interval = self._notifier.watchdog_interval_s
        if interval is None:
            return
        while True:
            started = time.monotonic()
            await asyncio.sleep(interval)
            lag = time.monotonic() - started - interval
            if self.healthy(lag, limit_s=interval):
                self._notifier.watchdog()
            else:
                self._rec.log("error", "unhealthy_no_watchdog_ping", loop_lag_s=round(lag, 3))
            self._notifier.status(self.status_line())
            self._rec.metrics.outbox.set(self._outbox.depth)

    async def serve_control(self) -> None:
        """The `control-socket` task."""
        path = self.config.vehicle.control_socket or self.config.state.dir / "control.sock"
        try:
            await serve_control(path, self.status, self.set_vehicle)
        except (ControlError, OSError) as exc:
            self._rec.log("error", "control_socket_unavailable", path=str(path), error=str(exc))
