"""The agent daemon: builds the rooms, runs their tasks in one TaskGroup, and shuts them down
in order. What each room owns is in its module under agent/runtime/ and in
docs/architecture.md; data flows one way:

    link -> intake -> executor -> worker -> results -> outbox -> link

Tasks, all in the one TaskGroup (each room's module says what its tasks do):
  vehicle-watch       watch     the car, the gate; preempts on close
  mqtt-connection     link      with, per connection: outbox-sender, job-receiver,
                                work-requester, status-publisher, job-heartbeat
  job-executor        executor  with its own `job:<id>` and `compute:<id>` tasks
  worker-reaper       executor  stops an idle worker
  result-publisher    results   seals, signs and files finished jobs
  energy-save         energy    the day's total on disk while jobs run
  state-probe         disk      tries a refusing state disk again every second
  replay-prune        intake    forgets expired job ids
  models-reload       shelf     reopens the model store after a reload
  power-governor      power     the duty cycle from the measured compute power
  duty-cycle          power     pauses and resumes the worker to that duty
  control-socket      operator  `edge-agent status`, live control of the emulated car
  systemd-supervisor  operator  READY, STATUS and watchdog pings
  stop-watch          here      turns the stop event into an ordered, time-boxed shutdown
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import ssl
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import __version__
from agent.config import AgentConfig
from agent.core.gate import Gate, GateDecision
from agent.core.governor import PowerGovernor
from agent.core.intake import SHUTDOWN
from agent.core.trust import Trust
from agent.inference.engine import WorkerEngine
from agent.inference.store import ModelStore
from agent.runtime.disk import StateDisk
from agent.runtime.energy import JobEnergy
from agent.runtime.executor import Executor
from agent.runtime.intake import Intake
from agent.runtime.journal import Journal
from agent.runtime.link import Link
from agent.runtime.metrics import AgentMetrics
from agent.runtime.models import Shelf
from agent.runtime.operator import Operator
from agent.runtime.outbox import Outbox
from agent.runtime.power import Power
from agent.runtime.record import Processor, Recorder
from agent.runtime.results import Results
from agent.runtime.systemd import Notifier
from agent.runtime.watch import Watch
from agent.state.jobs import JobStore
from agent.state.ledger import EnergyLedger
from agent.vehicle.snapshot import VehicleSignals, VehicleSnapshot
from agent.wire.messages import FOLDED_EVENTS, EventKind, VehicleStatus


class _Shutdown(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside the TaskGroup to end it after an orderly stop."""


class Agent:
    """One vehicle's agent. `run(stop)` serves until `stop` is set."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        vehicle: VehicleSignals,
        engine: WorkerEngine,
        store: ModelStore,
        signing_key: Ed25519PrivateKey,
        trust: Trust,
        ledger: EnergyLedger,
        jobs: JobStore,
        clock: Callable[[], float] = time.time,
        notifier: Notifier | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config  # the config in force: a reload swaps its owner and limits
        self.vehicle_id = config.vehicle.id
        self._clock = clock
        self._engine = engine
        self._trust = trust
        self._notifier = notifier or Notifier()
        self._stopping = False
        capacity = config.agent.capacity
        self.recorder = rec = Recorder(
            self.vehicle_id, AgentMetrics(enabled=config.agent.metrics_port != 0), clock
        )
        self.disk = disk = StateDisk(config.state.dir, jobs.probe, rec, clock)
        self.shelf = shelf = Shelf(store, rec)
        self.journal = journal = Journal(jobs, disk, rec, clock)
        self.energy = energy = JobEnergy(ledger, disk, self._local, clock, self._boundary_look)
        self.executor = executor = Executor(
            engine,
            shelf,
            journal,
            energy,
            rec,
            capacity=capacity,
            gate_open=lambda: self.gate.is_open,
            stopping=lambda: self._stopping,
            finished=lambda done: self.results.put(done),
            slot_freed=lambda: self.link.work_wanted(),
        )
        self.power = power = Power(
            engine,
            rec,
            cap_w=lambda: self.config.limits.power_cap_w,
            period_s=config.agent.governor_period_s,
            slot_s=config.agent.duty_slot_s,
            running=executor.running_key,
            job_running=executor.job_running,
        )
        self.watch = watch = Watch(
            lambda: self.config,
            vehicle,
            energy,
            power,
            rec,
            trust_valid=lambda: trust.valid(self.intake.trusted_now()),
            state_writable=lambda: disk.writable,
            computing=lambda: executor.current is not None,
            on_close=executor.preempt,
            on_change=self._gate_changed,
            clock=clock,
        )
        self.outbox = outbox = Outbox(
            jobs,
            disk,
            journal,
            rec,
            sent=lambda: self.link.work_wanted(),
        )
        self.results = Results(
            self.vehicle_id,
            signing_key,
            jobs=jobs,
            ledger=ledger,
            disk=disk,
            energy=energy,
            journal=journal,
            outbox=outbox,
            recorder=rec,
            capacity=capacity,
            clock=clock,
        )
        self.intake = intake = Intake(
            lambda: self.config,
            trust=trust,
            jobs=jobs,
            disk=disk,
            journal=journal,
            executor=executor,
            recorder=rec,
            models=lambda: shelf.held,
            gate_open=lambda: self.gate.is_open,
            stopping=lambda: self._stopping,
            trust_changed=lambda: self.link.status_changed(),
            clock=clock,
        )
        self.operator = operator = Operator(
            lambda: self.config,
            self._reconfigure,
            watch=watch,
            executor=executor,
            outbox=outbox,
            energy=energy,
            shelf=shelf,
            trust=trust,
            engine=engine,
            recorder=rec,
            notifier=self._notifier,
            clock=clock,
        )
        self.link = link = Link(
            lambda: self.config,
            rec,
            outbox,
            tls=tls,
            clock=clock,
            on_job=intake.job_message,
            on_hint=intake.hint_message,
            on_policy=intake.policy_message if trust.policy is not None else None,
            on_connect=self._connected,
            status=operator.status_message,
            may_ask=self._may_ask,
            busy_slots=executor.busy_slots,
            capacity=capacity,
            models=lambda: shelf.held,
            held_jobs=journal.held,
        )
        operator.link = link
        lean = self.config.agent.job_events == "lean"
        rec.connect(link.publish_event, unpublished=FOLDED_EVENTS if lean else frozenset())
        disk.on_change(self._look)
        disk.on_change(outbox.wake)
        disk.on_recovered(self.results.refile)

    # ---- what the rooms share ------------------------------------------------------

    @property
    def gate(self) -> Gate:
        return self.watch.gate

    @property
    def counts(self) -> Counter[str]:
        return self.recorder.counts

    @property
    def metrics(self) -> AgentMetrics:
        return self.recorder.metrics

    @property
    def governor(self) -> PowerGovernor:
        return self.power.governor

    @property
    def last_snapshot(self) -> VehicleSnapshot | None:
        return self.watch.last_snapshot

    def _local(self, at: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(at, self.config.owner.zone)

    def _reconfigure(self, config: AgentConfig) -> None:
        self.config = config

    def _boundary_look(self, now: float) -> VehicleSnapshot:
        self.power.close_window()
        return self.watch.snapshot(now)

    def _look(self) -> None:
        """Look at the car now (the gate's inputs changed: the state disk failed or recovered)."""
        self.watch.observe(self._clock())

    def _may_ask(self) -> bool:
        return (
            self.gate.is_open
            and not self._stopping
            and self.outbox.depth < self.config.agent.outbox_max
            and self.executor.worker_may_start()
        )

    def _gate_changed(self, decision: GateDecision) -> None:
        reasons = [r.value for r in decision.reasons]
        self.metrics.gate(decision.open, reasons)
        self._notifier.status(self.status_line())
        if decision.open:
            self.recorder.log("info", "gate_opened")
        else:
            self.recorder.log("info", "gate_closed", reasons=reasons)
        self.link.status_changed()
        self.link.work_wanted()

    async def _connected(self) -> None:
        self.operator.ready()
        await self.journal.hand_back_interrupted()

    # ---- the public face: what the CLI, the tests and the benchmarks use --------------

    def watch_happenings(self, processor: Processor) -> Callable[[], None]:
        """Watch every happening (tests, benchmarks); returns what stops watching."""
        return self.recorder.watch(processor)

    def status(self) -> dict[str, Any]:
        return self.operator.status()

    def status_line(self) -> str:
        return self.operator.status_line()

    def status_message(self, *, online: bool) -> VehicleStatus:
        return self.operator.status_message(online)

    def set_vehicle(self, fields: dict[str, Any]) -> dict[str, Any]:
        return self.operator.set_vehicle(fields)

    def reload(self, new: AgentConfig) -> list[str]:
        return self.operator.reload(new)

    def healthy(self, loop_lag_s: float, limit_s: float) -> bool:
        return self.operator.healthy(loop_lag_s, limit_s)

    def trusted_now(self) -> float:
        return self.intake.trusted_now()

    def compute_load(self) -> float:
        return self.power.compute_load()

    def compute_busy_s(self) -> float:
        return self.power.compute_busy_s()

    # ---- lifecycle ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then shut down in order within the grace period."""
        held = self._trust.policy
        if held is not None:
            self.metrics.policy_version.set(held.version)
        self.recorder.log(
            "info",
            "agent_starting",
            version=__version__,
            models=sorted(self.shelf.held),
            trust_policy=held.version if held else "fixed key list",
        )
        for problem in self.shelf.problems:
            self.recorder.log("warning", "model_left_out", problem=problem)
        port = self.config.agent.metrics_port
        if port:
            try:
                self.metrics.serve(port)
            except OSError as exc:
                self.recorder.log("error", "metrics_unavailable", port=port, error=str(exc))
        # A disk already full at start: the gate starts closed, not at the first job.
        if (refused := await self.disk.refusal()) is not None:
            self.disk.failed(refused, "starting")
        # Everything built so far lives as long as the process: move it out of the cyclic
        # collector's reach. A full collection then scans only what came later, instead of
        # stalling the loop for ~30-45 ms at random (measured: a preemption caught behind
        # one took 36 ms; docs/performance.md, section 2).
        gc.collect()
        gc.freeze()
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = {
                    "vehicle-watch": self.watch.run(),
                    "mqtt-connection": self.link.run(),
                    "job-executor": self.executor.run(),
                    "worker-reaper": self.executor.reap(),
                    "result-publisher": self.results.run(),
                    "energy-save": self.energy.run(self.executor.job_running),
                    "state-probe": self.disk.watch(),
                    "replay-prune": self.intake.run(),
                    "models-reload": self.shelf.run(),
                    "power-governor": self.power.govern(),
                    "duty-cycle": self.power.duty_cycle(),
                    "control-socket": self.operator.serve_control(),
                    "systemd-supervisor": self.operator.supervise(),
                    "stop-watch": self._stop_when(stop),
                }
                for name, coro in tasks.items():
                    tg.create_task(coro, name=name)
        except* _Shutdown:
            pass
        await self._engine.stop()
        await self.energy.save_day()
        self.disk.close()
        gc.unfreeze()  # (an agent run inside a longer process, as in the tests)
        self.recorder.log("info", "agent_stopped", **dict(self.counts))

    async def _stop_when(self, stop: asyncio.Event) -> None:
        """The ordered, time-boxed shutdown."""
        await stop.wait()
        self._stopping = True
        self._notifier.stopping()
        grace = self.config.agent.shutdown_grace_s
        self.recorder.log("info", "agent_stopping", grace_s=grace)
        # Phase 1: no new work; let the running job finish within the grace period.
        await self.executor.finish_running(grace)
        try:
            async with asyncio.timeout(max(grace, 1.0)):
                await self.executor.idle.wait()
                await self.results.flushed()  # finished results are filed, not dropped
        except TimeoutError:
            self.recorder.log("warning", "executor_not_idle_at_shutdown")
        # Phase 2: hand back what was accepted but not started.
        for item in self.executor.take_queued():
            await self.journal.happened(item.key, EventKind.RELEASED, SHUTDOWN, "agent stopping")
        # Phase 3: flush the outbox while connected (what stays is sent at the next start).
        if not await self.link.outbox_flushed(max(grace, 1.0)):
            self.recorder.log("warning", "outbox_not_flushed", results_waiting=self.outbox.depth)
        # Phase 4: say goodbye (a clean disconnect does not fire the Last Will).
        await self.link.say_goodbye()
        raise _Shutdown
