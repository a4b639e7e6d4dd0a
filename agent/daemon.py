"""The agent daemon: wires the vehicle, the gate, the broker and the engine in one TaskGroup.

Tasks, each named and owned here:
  vehicle-watch       looks at the car (at each poll, at the scenario's next event, on a
                      kernel uevent), runs the gate, preempts on close; probes a failed
                      state disk; prunes the replay record
  mqtt-connection     connects (backoff reset only by a healthy connection, packets over
                      the limit refused before they are read) and owns, per connection:
      outbox-sender       publishes filed results in order, removing each on its PUBACK
      job-receiver        verifies, parses and admits jobs (and trust policy updates)
      work-requester      asks for work while the gate is open and a slot is free
      status-publisher    keeps the retained status current
      job-heartbeat       tells the fleet which jobs this vehicle still holds
  job-executor        runs accepted jobs one at a time (each in a `job:<id>` task it awaits)
  result-publisher    seals, signs and files finished jobs to the outbox
  stop-watch          turns the stop event into an ordered, time-boxed shutdown
  control-socket      `edge-agent status` and live control of the emulated car
  power-governor      sets the duty cycle from the measured compute power
  duty-cycle          pauses and resumes the worker to that duty
  systemd-supervisor  READY, STATUS and watchdog pings
Outside the TaskGroup: a reload's model-store refresh (`models-reload`), still to move in.
The decisions themselves (gate, admission, backoff, clock floor, energy, wire codec) are
pure code in agent.core and agent.wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import ssl
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import BUILT_ON, __version__
from agent.config import AgentConfig
from agent.core.admission import AdmissionContext, HeldModel, admit
from agent.core.clock import raised_floor, start_floor, trusted_now
from agent.core.energy import EnergyMeter
from agent.core.gate import Gate, GateDecision, GateInputs, GatePolicy, GateReason
from agent.core.governor import PowerGovernor
from agent.core.trust import Trust
from agent.inference.engine import WorkerEngine
from agent.inference.store import ModelStore, ModelStoreError
from agent.kit.backoff import ReconnectBackoff
from agent.kit.logs import get_logger
from agent.kit.mqtt import NO_DELAY, guard_packet_size, publish_acked
from agent.runtime.control import ControlError, serve_control
from agent.runtime.metrics import AgentMetrics
from agent.runtime.systemd import Notifier
from agent.state.jobs import JobStore
from agent.state.ledger import EnergyLedger, is_storage_error
from agent.vehicle.emulated import EmulatedVehicle
from agent.vehicle.snapshot import VehicleSignals, VehicleSnapshot
from agent.vehicle.uevents import UeventWatcher
from agent.wire import envelope
from agent.wire.bundle import encode_result_body, is_bundle, sign_result, verify_job_bundle
from agent.wire.codec import dump_model, parse_model
from agent.wire.errors import Reason, WireError
from agent.wire.keys import sealable_x25519_public
from agent.wire.messages import (
    SUITE,
    EventKind,
    JobEvent,
    JobSpec,
    ModelHeld,
    ResultBody,
    SealedResult,
    VehicleStatus,
    WorkRequest,
)
from agent.wire.sealing import result_info, seal
from agent.wire.tensors import Tensor
from agent.wire.topics import POLICY_TOPIC, Channel, topic

# Room for MQTT headers and topic names on top of the largest payload we accept.
_PACKET_OVERHEAD = 4096
ENERGY_SAVE_EVERY_S = 5.0
READY_AFTER_S = 3.0
MAX_WORKER_CRASHES = 2
PRUNE_EVERY_S = 600.0
# A connection must stay up this long before the reconnect backoff starts again from its base.
HEALTHY_AFTER_S = 30.0
STATE_PROBE_EVERY_S = 1.0  # how often a failed state disk is tried again
LOAD_WINDOW_S = 0.1

_T = TypeVar("_T")
_P = ParamSpec("_P")


def gate_policy(config: AgentConfig) -> GatePolicy:
    limits = config.limits
    return GatePolicy(
        opted_in=config.owner.opted_in,
        max_compute_temp_c=limits.max_compute_temp_c,
        resume_compute_temp_c=limits.resume_compute_temp_c,
        max_battery_temp_c=limits.max_battery_temp_c,
        resume_battery_temp_c=limits.resume_battery_temp_c,
        min_soc_pct=limits.min_soc_pct,
        resume_soc_pct=limits.resume_soc_pct,
        daily_energy_wh=limits.daily_energy_wh,
        hold_s=limits.gate_hold_s,
    )


@dataclass(frozen=True, slots=True)
class _Finished:
    item: AcceptedJob
    outputs: dict[str, Tensor]
    runtime_ms: float
    energy_wh: float


@dataclass(frozen=True, slots=True)
class AcceptedJob:
    job: JobSpec
    model: HeldModel
    digest: str  # sha256 of what the fleet signed; binds the sealed result


def _request_key(job: JobSpec) -> str:
    return f"{job.job_id}#{job.attempt}"


def _counting_queue(
    on_drop: Callable[[aiomqtt.Message], None],
) -> type[asyncio.Queue[aiomqtt.Message]]:
    """aiomqtt's inbound queue type, telling `on_drop` about each message it has to discard."""

    class CountingQueue(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            try:
                super().put_nowait(item)
            except asyncio.QueueFull:
                on_drop(item)
                raise

    return CountingQueue


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
        self._tls = tls
        self.config = config
        self.vehicle_id = config.vehicle.id
        self._vehicle = vehicle
        self._engine = engine
        self._store = store
        self._key = signing_key
        self._trust = trust
        self._clock = clock
        self._log = get_logger(vehicle_id=self.vehicle_id)
        self.gate = Gate(gate_policy(config))
        self._hours = config.owner.allowed_hours  # built once; rebuilt on reload
        self._ledger = ledger
        today = self._local(clock()).date().isoformat()
        self.energy = EnergyMeter(day=today, today_wh=ledger.day_total(today))
        self._energy_saved_at = 0.0
        self._energy_booked: set[tuple[str, int]] = set()
        # The job whose compute the worker is doing: every interval of energy is booked to it.
        self._energy_job: tuple[str, int] | None = None
        self._load_window_closes = False  # the next load reading ends its window, however short
        self._busy_s = 0.0
        self._busy_mark: tuple[int | None, float] | None = None
        # Jobs that killed the worker, and how often; two strikes and the job is not run here.
        self._worker_crashes: Counter[str] = Counter()
        self._load_mark: tuple[float, float] | None = None
        self._load = 0.0
        self._power_samples: list[float] = []
        self._idle_power_w: float | None = None
        self.governor = PowerGovernor(cap_w=config.limits.power_cap_w, idle_w=0.0)
        self.last_snapshot: VehicleSnapshot | None = None
        self._capacity = config.agent.capacity
        self._queue: asyncio.Queue[AcceptedJob] = asyncio.Queue(maxsize=self._capacity)
        self._deliveries: asyncio.Queue[_Finished] = asyncio.Queue(maxsize=self._capacity)
        self._jobs = jobs  # the durable replay record, journal, clock floor and outbox
        self._held: dict[tuple[str, int], JobSpec] = {}  # accepted and not finished, for heartbeats
        self.metrics = AgentMetrics(enabled=config.agent.metrics_port != 0)
        # Blocking work (the state database, outbox files, sealing a result) runs on one
        # thread of its own: SQLite takes one writer at a time anyway, and the default
        # executor would grow to cores + 4 threads (~0.5 MB each) and keep them.
        self._io_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agent-io")
        self._notifier = notifier or Notifier()
        self._ready_sent = False
        # Replay record in memory, with expiries; pruned with the database every PRUNE_EVERY_S.
        self._seen: dict[tuple[str, int], float] = jobs.load_seen(clock())
        self._pruned_at = clock()
        self._interrupted = jobs.interrupted()
        self._outbox_depth = jobs.outbox_size()
        held_policy = trust.policy
        self._clock_floor = start_floor(
            jobs.clock_floor(),
            held_policy.policy.issued_at if held_policy is not None else None,
            dt.datetime.fromisoformat(BUILT_ON).replace(tzinfo=dt.UTC).timestamp(),
        )
        self._outbox_ready = asyncio.Event()
        self._vehicle_changed = asyncio.Event()  # a pushed change of the car: look now
        # A full or failing state disk: what failed, and results finished meanwhile that could
        # not be filed (held in memory, filed when the disk takes writes again).
        self._state_fault: str | None = None
        self._state_probed_at = 0.0
        self._unfiled: list[_Finished] = []
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._wake_requester = asyncio.Event()
        self._status_dirty = asyncio.Event()
        self._current: tuple[AcceptedJob, asyncio.Task[None]] | None = None
        self._executor_idle = asyncio.Event()
        self._job_running = asyncio.Event()
        self._preempt_reason = ""
        self._preempted: AcceptedJob | None = None  # the job whose compute we stopped
        self._outstanding = 0  # jobs asked for and not yet arrived
        self._request_id = 0
        self._stopping = False
        self._reopening: asyncio.Task[None] | None = None  # a reload's model-store refresh
        # What happened, for `status` and tests: counts by event kind and reason.
        self.counts: Counter[str] = Counter()

    # ---- lifecycle -------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then shut down in order within the grace period."""
        held = self._trust.policy
        if held is not None:
            self.metrics.policy_version.set(held.version)
        self._log.info(
            "agent_starting",
            version=__version__,
            models=sorted(self._store.held),
            trust_policy=held.version if held else "fixed key list",
        )
        for problem in self._store.problems:
            self._log.warning("model_left_out", problem=problem)
        if self.config.agent.metrics_port:
            try:
                self.metrics.serve(self.config.agent.metrics_port)
            except OSError as exc:
                self._log.error(
                    "metrics_unavailable", port=self.config.agent.metrics_port, error=str(exc)
                )
        # A disk already full at start: the gate starts closed, not at the first job.
        if (refused := await self._disk_refusal()) is not None:
            self._state_failed(refused, "starting")
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watch_vehicle(), name="vehicle-watch")
                tg.create_task(self._stay_connected(), name="mqtt-connection")
                tg.create_task(self._execute(), name="job-executor")
                tg.create_task(self._deliver_results(), name="result-publisher")
                tg.create_task(self._stop_when(stop), name="stop-watch")
                tg.create_task(self._serve_control(), name="control-socket")
                tg.create_task(self._govern_power(), name="power-governor")
                tg.create_task(self._duty_cycle(), name="duty-cycle")
                tg.create_task(self._supervise(), name="systemd-supervisor")
        except* _Shutdown:
            pass
        await self._engine.stop()
        await self._record(self._ledger.save_day, self.energy.day, self.energy.today_wh)
        self._io_thread.shutdown(wait=True)
        self._log.info("agent_stopped", **dict(self.counts))

    async def _io(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run `fn(*args, **kwargs)` on the agent's I/O thread, off the event loop."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._io_thread, call)

    async def _record(self, fn: Callable[_P, Any], *args: _P.args, **kwargs: _P.kwargs) -> bool:
        """A state write whose failure must end neither the job's handling nor the daemon: on
        a full or failing disk the gate closes (state_disk_unavailable) and False is returned."""
        try:
            await self._io(fn, *args, **kwargs)
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            self._state_failed(exc, getattr(fn, "__name__", "write"))
            return False
        return True

    def _state_failed(self, exc: BaseException, doing: str) -> None:
        """The state disk refused a write: close the gate until a probe succeeds."""
        self.counts["state_write_failed"] += 1
        self.metrics.state_write_failures.inc()
        if self._state_fault is None:
            self._state_fault = f"{doing}: {type(exc).__name__}: {exc}"
            self._state_probed_at = self._clock()
            self._log.error(
                "state_disk_unavailable",
                doing=doing,
                error=f"{type(exc).__name__}: {exc}",
                state_dir=str(self.config.state.dir),
                what_to_do="free space on the state disk (or replace it); the agent retries "
                "every second and reopens the gate by itself",
            )
            self.observe(self._clock())

    async def _disk_refusal(self) -> BaseException | None:
        """What the state disk raises when tried (JobStore.probe), or None if it takes writes."""
        try:
            await self._io(self._jobs.probe, self._clock())
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            return exc
        return None

    async def _probe_state(self) -> None:
        """Try the state disk again; on success file the results held meanwhile and reopen."""
        if await self._disk_refusal() is not None:
            return
        held, self._unfiled = self._unfiled, []
        for i, done in enumerate(held):
            if not await self._file(done):
                self._unfiled = held[i:] if not self._unfiled else self._unfiled + held[i + 1 :]
                return
        self._log.info("state_disk_recovered", was=self._state_fault, results_filed=len(held))
        self._state_fault = None
        self.observe(self._clock())
        self._outbox_ready.set()

    async def _file(self, done: _Finished) -> bool:
        """Seal, sign and put one finished job in the outbox. A disk that refuses keeps the
        result in memory (False); any other failure fails that job, typed, and only it."""
        job = done.item.job
        try:
            await self._io(self._file_result, done, self.energy.day, self.energy.today_wh)
        except WireError as err:  # the result cannot be sealed: the job fails, typed
            await self._filing_failed(done, err.reason.value, err.detail)
            return True
        except Exception as exc:
            if is_storage_error(exc):
                self._state_failed(exc, "filing a result")
                self._unfiled.append(done)
                return False
            self._log.exception("result_not_filed", job_id=job.job_id, attempt=job.attempt)
            await self._filing_failed(
                done,
                Reason.AGENT_ERROR.value,
                f"sealing or filing the result failed: {type(exc).__name__}: {exc}",
            )
            return True
        self._outbox_depth += 1
        self._outbox_ready.set()
        return True

    async def _filing_failed(self, done: _Finished, reason: str, detail: str) -> None:
        """A finished job whose result cannot be filed: it fails, its energy is kept as such."""
        job = done.item.job
        await self._record(
            self._ledger.record_job,
            job.job_id,
            job.attempt,
            self.energy.day,
            done.energy_wh,
            self._clock(),
            "failed",
            self.energy.today_wh,
        )
        await self._record(self._jobs.finish, job.job_id, job.attempt)
        await self._event_soon(job, EventKind.FAILED, reason, detail)

    async def _stop_when(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._stopping = True
        self._notifier.stopping()
        self._log.info("agent_stopping", grace_s=self.config.agent.shutdown_grace_s)
        grace = self.config.agent.shutdown_grace_s
        # Phase 1: no new work; let the running job finish within the grace period.
        if self._current is not None:
            _, task = self._current
            done, _ = await asyncio.wait({task}, timeout=grace)
            if not done:
                self._preempt("shutdown")
        try:
            async with asyncio.timeout(max(grace, 1.0)):
                await self._executor_idle.wait()
                await self._deliveries.join()  # finished results are flushed, not dropped
        except TimeoutError:
            self._log.warning("executor_not_idle_at_shutdown")
        # Phase 2: hand back what was accepted but not started.
        while not self._queue.empty():
            item = self._queue.get_nowait()
            self._held.pop((item.job.job_id, item.job.attempt), None)
            await self._record(self._jobs.finish, item.job.job_id, item.job.attempt)
            await self._event_soon(item.job, EventKind.RELEASED, "shutdown", "agent stopping")
        # Phase 3: flush the outbox while connected (what stays is sent at the next start).
        try:
            async with asyncio.timeout(max(grace, 1.0)):
                while self._outbox_depth and self._connected.is_set():  # noqa: ASYNC110 - a time-boxed poll of the sender's counter
                    await asyncio.sleep(0.02)
        except TimeoutError:
            self._log.warning("outbox_not_flushed", results_waiting=self._outbox_depth)
        # Phase 4: say goodbye (a clean disconnect does not fire the Last Will).
        if self._client is not None:
            try:
                async with asyncio.timeout(2.0):
                    await self._publish_status(self._client, online=False)
            except (TimeoutError, aiomqtt.MqttError):
                self._log.warning("offline_status_not_sent")
        raise _Shutdown

    # ---- the vehicle and the gate ---------------------------------------

    def _local(self, at: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(at, self.config.owner.zone)

    def _running_key(self) -> tuple[str, int] | None:
        return (
            (self._current[0].job.job_id, self._current[0].job.attempt) if self._current else None
        )

    async def _prune_replay_record(self) -> None:
        """Forget job ids whose jobs have expired: they would be refused as expired anyway."""
        now = self.trusted_now()
        self._pruned_at = self._clock()
        for key in [k for k, expires in self._seen.items() if expires < now]:
            del self._seen[key]
        await self._record(self._jobs.prune_seen, now)

    def trusted_now(self) -> float:
        """The system clock, but never earlier than the latest signed issue time seen: a clock
        set backwards does not make expired jobs valid again."""
        now = self._clock()
        if now < self._clock_floor:
            self.counts["clock_behind_floor"] += 1
        return trusted_now(now, self._clock_floor)

    def compute_load(self) -> float:
        """The worker's measured CPU use as a fraction of its threads, over contiguous windows
        of at least LOAD_WINDOW_S (one duty-cycle slot).

        This drives the emulated car's compute power, so on the emulator the power governor
        closes its loop over real CPU time, not over its own commands. Windows tile time
        without overlap, so averaging the readings gives the true average, like a real
        energy counter.
        """
        cpu = self._engine.cpu_seconds()
        now = time.monotonic()
        if cpu is None:
            self._load_mark = None
            self._load = 0.0
            return 0.0
        if self._load_mark is None:
            self._load_mark = (now, cpu)
            return self._load
        t0, c0 = self._load_mark
        if now - t0 >= LOAD_WINDOW_S or (self._load_window_closes and now > t0):
            self._load_window_closes = False
            self._load = max(0.0, min(1.0, (cpu - c0) / (now - t0) / self._engine.threads))
            self._load_mark = (now, cpu)
        return self._load

    def compute_busy_s(self) -> float:
        """Seconds of full compute load so far: the worker's CPU time over its threads, summed
        across worker restarts (monotonic). The emulated car's energy counter follows it."""
        cpu, pid = self._engine.cpu_seconds(), self._engine.pid
        last, self._busy_mark = self._busy_mark, (pid, cpu) if cpu is not None else None
        if cpu is None:
            return self._busy_s
        grown = cpu - last[1] if last is not None and last[0] == pid else cpu  # a new worker
        self._busy_s += max(0.0, grown) / self._engine.threads
        return self._busy_s

    def observe(self, now: float) -> GateDecision:
        """One look at the car: account energy, evaluate the gate, react to a change."""
        snap = self._vehicle.snapshot(now)
        local = self._local(now)
        self.energy.sample(
            now,
            snap.compute_power_w,
            local.date().isoformat(),
            self._energy_job,
            snap.compute_energy_j,
        )
        decision = self.gate.evaluate(
            GateInputs(
                snap,
                within_hours=self._hours.allows(local),
                energy_today_wh=self.energy.today_wh,
                trust_valid=self._trust.valid(self.trusted_now()),
                state_writable=self._state_fault is None,
            )
        )
        self.last_snapshot = snap
        self.metrics.compute_power.set(snap.compute_power_w)
        self.metrics.compute_temp.set(snap.compute_temp_c)
        self.metrics.energy_today.set(self.energy.today_wh)
        if self._current is not None:
            self._power_samples.append(snap.compute_power_w)
        elif self._engine.pid is None:
            idle = self._idle_power_w
            self._idle_power_w = (
                snap.compute_power_w if idle is None else idle + 0.1 * (snap.compute_power_w - idle)
            )
            self.governor.idle_w = self._idle_power_w
            if snap.compute_max_w is not None:
                self.governor.assume_full_power(snap.compute_max_w)
        if snap.faults and decision.changed:
            self._log.error("sensor_fault", faults=list(snap.faults))
        if decision.changed:
            self._on_gate_change(decision)
        return decision

    def vehicle_changed(self, *_: object) -> None:
        """Something says the car changed (a kernel uevent): look at it now, not at the poll."""
        self._vehicle_changed.set()

    async def _wait_for_vehicle(self, poll_s: float) -> None:
        """Until the next look at the car: the poll interval, cut short by a pushed change
        (a uevent) or by the instant the scenario's next event changes the car."""
        delay = poll_s
        next_change = getattr(self._vehicle, "next_change_at", lambda: None)()
        if next_change is not None:
            # At least 0.5 ms: a change due now but not yet applied must not spin the loop.
            delay = min(delay, max(0.0005, next_change - self._clock()))
        try:
            async with asyncio.timeout(delay):
                await self._vehicle_changed.wait()
        except TimeoutError:
            pass
        self._vehicle_changed.clear()

    def _watch_uevents(self) -> UeventWatcher | None:
        """On a rig, listen to the kernel's uevents for the signals read from sysfs."""
        subsystems: frozenset[str] = getattr(self._vehicle, "uevent_subsystems", frozenset())
        if not subsystems:
            return None
        watcher = UeventWatcher(subsystems, self.vehicle_changed)
        why_not = watcher.start(asyncio.get_running_loop())
        if why_not is not None:
            self._log.warning(
                "uevents_unavailable", reason=why_not, polling_s=self.config.agent.vehicle_poll_s
            )
            return None
        self._log.info("uevents_watched", subsystems=sorted(subsystems))
        return watcher

    async def _watch_vehicle(self) -> None:
        watcher = self._watch_uevents()
        try:
            await self._watch_vehicle_loop()
        finally:
            if watcher is not None:
                watcher.close()

    async def _watch_vehicle_loop(self) -> None:
        while True:
            now = self._clock()
            self.observe(now)
            if self._current is None:
                await self._engine.stop_if_idle(time.monotonic())
            if self._state_fault is not None and now - self._state_probed_at >= STATE_PROBE_EVERY_S:
                self._state_probed_at = now
                await self._probe_state()
            if now - self._pruned_at >= PRUNE_EVERY_S:
                await self._prune_replay_record()
            if self._current is not None and now - self._energy_saved_at >= ENERGY_SAVE_EVERY_S:
                self._energy_saved_at = now
                await self._record(self._ledger.save_day, self.energy.day, self.energy.today_wh)
            # Fast while computing (a close must stop compute at once); slower while the gate
            # is closed and nothing runs, where a second's delay in reopening costs nothing.
            busy = self.gate.is_open or self._current is not None
            agent_cfg = self.config.agent
            await self._wait_for_vehicle(
                agent_cfg.vehicle_poll_s
                if busy
                else max(agent_cfg.vehicle_poll_s, agent_cfg.closed_poll_s)
            )

    def _on_gate_change(self, decision: GateDecision) -> None:
        reasons = [r.value for r in decision.reasons]
        self.metrics.gate(decision.open, reasons)
        self._notifier.status(self._status_line())
        if decision.open:
            self._log.info("gate_opened")
        else:
            self._preempt(",".join(reasons))  # first: compute stops before anything is logged
            self._log.info("gate_closed", reasons=reasons)
        self._status_dirty.set()
        self._wake_requester.set()

    def _preempt(self, reason: str) -> None:
        if self._current is not None or self._engine.has_work:
            self._engine.kill()  # compute stops here (also a staged job), before anything else
        if self._current is not None:
            self._preempt_reason = reason
            self._preempted = self._current[0]
            self._current[1].cancel()

    # ---- the power cap -----------------------------------------------------

    async def _govern_power(self) -> None:
        """Every control period, set the duty cycle from the average compute power measured."""
        period = self.config.agent.governor_period_s
        governed_job: tuple[str, int] | None = None
        while True:
            await self._job_running.wait()  # nothing to govern while no job runs
            await asyncio.sleep(period)
            if self.governor.cap_w != self.config.limits.power_cap_w:
                self.governor.set_cap(self.config.limits.power_cap_w)
            samples, self._power_samples = self._power_samples, []
            running = self._running_key()
            fresh, governed_job = running != governed_job, running
            # The first period of a job includes the worker starting: not the plant to learn.
            if running is None or not samples or fresh:
                continue
            applied = self.governor.duty
            duty = self.governor.update(sum(samples) / len(samples), applied)
            self.metrics.duty.set(duty)
            if abs(duty - applied) > 0.05:
                self._log.debug("duty_changed", duty=round(duty, 3), cap_w=self.governor.cap_w)

    async def _duty_cycle(self) -> None:
        """Run the worker for `duty` of every slot and pause it (SIGSTOP) for the rest."""
        slot = self.config.agent.duty_slot_s
        while True:
            # Governed while the worker has anything to compute: the running job, or the next
            # one staged behind it (it starts in the worker before the executor picks it up).
            if not self._engine.has_work:
                self._engine.resume()
                await self._job_running.wait()
            duty = self.governor.duty
            if duty >= 0.999:
                self._engine.resume()
                await asyncio.sleep(slot)
            elif duty <= 0.001:
                self._engine.pause()
                await asyncio.sleep(slot)
            else:
                self._engine.resume()
                await asyncio.sleep(duty * slot)
                if self._engine.has_work:
                    self._engine.pause()
                await asyncio.sleep((1.0 - duty) * slot)

    # ---- operators: status, live control, reload --------------------------

    def status(self) -> dict[str, Any]:
        """What `edge-agent status` shows: gate and reasons, the car, the job, energy."""
        decision = self.gate.last
        snap = self.last_snapshot
        current = self._current[0].job if self._current else None
        return {
            "vehicle_id": self.vehicle_id,
            "connected": self._connected.is_set(),
            "gate": {
                "open": bool(decision and decision.open),
                "reasons": [r.value for r in decision.reasons] if decision else ["starting"],
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
                "energy_wh": round(self.energy.job_wh((current.job_id, current.attempt)), 6),
            },
            "scenario": self._scenario_status(),
            "queued_jobs": self._queue.qsize(),
            "outbox": self._outbox_depth,
            "energy": {
                "day": self.energy.day,
                "today_wh": round(self.energy.today_wh, 6),
                "daily_allowance_wh": self.config.limits.daily_energy_wh,
            },
            "counts": dict(self.counts),
        }

    def _scenario_status(self) -> dict[str, Any] | None:
        """Where the emulated car's scenario stands: its time base and its next change."""
        emulated = getattr(self._vehicle, "emulated", self._vehicle)
        if not isinstance(emulated, EmulatedVehicle):
            return None
        return {
            "started_at": emulated.started_at,
            "time_scale": emulated.time_scale,
            "next_change_at": emulated.next_change_at(),
        }

    def set_vehicle(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Live control of the emulated car (rigs, demos). ValueError if not possible."""
        emulated = getattr(self._vehicle, "emulated", self._vehicle)
        if not isinstance(emulated, EmulatedVehicle):
            raise ValueError("this vehicle has no emulated state to set")  # noqa: TRY004 - an operator error, reported as such
        state = emulated.set(self._clock(), **fields)
        self.observe(self._clock())
        return state.model_dump(mode="json")

    async def _serve_control(self) -> None:
        path = self.config.vehicle.control_socket or self.config.state.dir / "control.sock"
        try:
            await serve_control(path, self.status, self.set_vehicle)
        except (ControlError, OSError) as exc:
            self._log.error("control_socket_unavailable", path=str(path), error=str(exc))

    def reload(self, new: AgentConfig) -> list[str]:
        """Apply a reloaded config. Returns the sections that need a restart to take effect."""
        restart = [
            name
            for name in ("vehicle", "sensors", "broker", "keys", "models", "state", "agent")
            if getattr(new, name) != getattr(self.config, name)
        ]
        self.config = self.config.model_copy(update={"owner": new.owner, "limits": new.limits})
        self.gate.update_policy(gate_policy(self.config))
        self._hours = self.config.owner.allowed_hours
        if self._store.manifests_stamp() != self._store.stamp:  # a model was installed
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._reopen_models(self._open_store())
            else:  # hashing and inspecting every model must not stall the loop (or duty cycle)
                self._reopening = loop.create_task(
                    self._reopen_models_off_loop(), name="models-reload"
                )
        self._log.info("config_reloaded", restart_needed_for=restart or None)
        self.observe(self._clock())
        self._status_dirty.set()
        return restart

    def _open_store(self) -> ModelStore | ModelStoreError:
        old = self._store
        try:
            return ModelStore.open(
                old.folder,
                installed=old.installed,
                allowed_domains=old.allowed_domains,
                max_bytes=old.max_bytes,
            )
        except ModelStoreError as exc:
            return exc

    async def _reopen_models_off_loop(self) -> None:
        self._reopen_models(await asyncio.to_thread(self._open_store))

    def _reopen_models(self, store: ModelStore | ModelStoreError) -> None:
        """Pick up models installed since the start (`edge-agent models add`), re-verified."""
        old = self._store
        if isinstance(store, ModelStoreError):
            self._log.error("models_not_reloaded", error=str(store), kept=sorted(old.held))
            return
        self._store = store
        for problem in store.problems:
            self._log.warning("model_left_out", problem=problem)
        added = sorted(set(store.held) - set(old.held))
        if added:
            self._log.info("models_added", models=added)

    # ---- the connection ---------------------------------------------------

    def _inbound_dropped(self, message: aiomqtt.Message) -> None:
        """A message arrived while the inbound queue was full (a flood): it is dropped, counted
        and logged. A job dropped here was never accepted: the fleet's lease expires and it
        goes to another car."""
        self.counts["inbound_dropped"] += 1
        self.metrics.inbound_dropped.inc()
        dropped = self.counts["inbound_dropped"]
        if dropped == 1 or dropped % 100 == 0:
            self._log.warning(
                "inbound_queue_full_message_dropped",
                topic=message.topic.value,
                dropped_total=dropped,
                queue_limit=self._capacity * 4 + 16,
            )

    @property
    def _max_packet_bytes(self) -> int:
        return self.config.agent.max_message_bytes + _PACKET_OVERHEAD

    def _oversized_packet(self, announced: int) -> None:
        """The broker announced a packet over our limit: we disconnect before reading it."""
        self.counts["oversized_packets"] += 1
        self.metrics.oversized_packets.inc()
        self._log.error(
            "oversized_packet_refused",
            announced_bytes=announced,
            limit_bytes=self._max_packet_bytes,
            what="disconnected before reading it; reconnecting with backoff",
        )

    def _make_client(self) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.MaximumPacketSize = self._max_packet_bytes
        offline = VehicleStatus(
            vehicle_id=self.vehicle_id,
            online=False,
            gate_open=False,
            reasons=("connection_lost",),
            agent_version=__version__,
            at=self._clock(),
            policy_version=self._trust.policy.version if self._trust.policy else None,
        )
        b = self.config.broker
        return aiomqtt.Client(
            b.host,
            b.port,
            identifier=f"vehicle-{self.vehicle_id}",
            protocol=aiomqtt.ProtocolVersion.V5,
            keepalive=b.keepalive_s,
            will=aiomqtt.Will(
                topic(self.vehicle_id, Channel.STATUS), dump_model(offline), qos=1, retain=True
            ),
            max_queued_incoming_messages=self._capacity * 4 + 16,
            queue_type=_counting_queue(self._inbound_dropped),
            max_inflight_messages=20,
            properties=props,
            timeout=10,
            socket_options=NO_DELAY,
            tls_context=self._tls,
        )

    async def _stay_connected(self) -> None:
        backoff = ReconnectBackoff(base_s=0.5, cap_s=30.0, healthy_after_s=HEALTHY_AFTER_S)
        while True:
            try:
                client = self._make_client()
                guard_packet_size(client, self._max_packet_bytes, self._oversized_packet)
                async with client:
                    self._client = client
                    await client.subscribe(topic(self.vehicle_id, Channel.JOBS), qos=1)
                    if self._trust.policy is not None:
                        await client.subscribe(POLICY_TOPIC, qos=1)
                    self._connected.set()
                    if not self._ready_sent:
                        self._ready_sent = self._notifier.ready(self._status_line()) or True
                    backoff.connected(time.monotonic())
                    self._log.info(
                        "connected", broker=f"{self.config.broker.host}:{self.config.broker.port}"
                    )
                    self._status_dirty.set()
                    await self._report_interrupted()
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._send_outbox(client), name="outbox-sender")
                        tg.create_task(self._receive_jobs(client), name="job-receiver")
                        tg.create_task(self._request_work(client), name="work-requester")
                        tg.create_task(self._publish_statuses(client), name="status-publisher")
                        tg.create_task(self._heartbeat(client), name="job-heartbeat")
            except* aiomqtt.MqttError as group:
                self._log.warning("disconnected", reason=str(group.exceptions[0]))
            finally:
                self._connected.clear()
                self._client = None
                self._outstanding = 0
            delay = backoff.next_delay(time.monotonic())
            self.counts["reconnects"] += 1
            self.metrics.reconnects.inc()
            self._log.info("reconnect_wait", delay_s=round(delay, 2))
            await asyncio.sleep(delay)

    def _status_line(self) -> str:
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
        link = "connected" if self._connected.is_set() else "broker unreachable"
        return f"{gate}; {link}; outbox {self._outbox_depth}"

    def healthy(self, loop_lag_s: float, limit_s: float) -> bool:
        """The event loop keeps time and a running job still has its worker."""
        if loop_lag_s > limit_s:
            return False
        return not (self._current is not None and self._engine.busy and self._engine.pid is None)

    async def _supervise(self) -> None:
        """READY once connected, or after a few seconds anyway (the agent runs offline);
        watchdog pings only while healthy, so systemd restarts a hung agent."""
        await asyncio.sleep(READY_AFTER_S)
        if not self._ready_sent:
            self._ready_sent = self._notifier.ready(self._status_line()) or True
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
                self._log.error("unhealthy_no_watchdog_ping", loop_lag_s=round(lag, 3))
            self._notifier.status(self._status_line())
            self.metrics.outbox.set(self._outbox_depth)

    def status_message(self, *, online: bool) -> VehicleStatus:
        """What the retained status topic says about this vehicle."""
        decision = self.gate.last
        return VehicleStatus(
            vehicle_id=self.vehicle_id,
            online=online,
            gate_open=bool(decision and decision.open) and online,
            reasons=tuple(r.value for r in decision.reasons) if decision else (),
            agent_version=__version__,
            at=self._clock(),
            policy_version=self._trust.policy.version if self._trust.policy else None,
        )

    async def _publish_status(self, client: aiomqtt.Client, *, online: bool) -> None:
        status = self.status_message(online=online)
        await publish_acked(
            client, topic(self.vehicle_id, Channel.STATUS), dump_model(status), retain=True
        )

    async def _publish_statuses(self, client: aiomqtt.Client) -> None:
        while True:
            await self._status_dirty.wait()
            self._status_dirty.clear()
            await self._publish_status(client, online=True)

    async def _request_work(self, client: aiomqtt.Client) -> None:
        interval = self.config.agent.work_request_interval_s
        while True:
            self._wake_requester.clear()
            busy = self._queue.qsize() + (1 if self._current else 0) + self._outstanding
            free = self._capacity - busy
            # Ask as soon as a slot frees: a request costs ~200 bytes and keeps the queue full.
            worth_asking = free > 0 and self._outbox_depth < self.config.agent.outbox_max
            if self.gate.is_open and not self._stopping and worth_asking:
                self._request_id += 1
                held = self._store.held.values()
                request = WorkRequest(
                    vehicle_id=self.vehicle_id,
                    request_id=self._request_id,
                    capacity=free,
                    models=tuple(ModelHeld(name=m.name, sha256=m.sha256) for m in held),
                    sent_at=self._clock(),
                )
                self._outstanding += free
                await publish_acked(
                    client, topic(self.vehicle_id, Channel.WORK), dump_model(request)
                )
            try:
                async with asyncio.timeout(interval):
                    await self._wake_requester.wait()
            except TimeoutError:
                self._outstanding = 0  # whatever was not sent by now is not coming

    # ---- jobs in ----------------------------------------------------------

    async def _receive_jobs(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            raw = payload if isinstance(payload, bytes) else str(payload).encode()
            if message.topic.matches(POLICY_TOPIC):
                await self.handle_policy_message(raw)
            else:
                await self.handle_job_message(raw)

    async def handle_policy_message(self, raw: bytes) -> None:
        """A trust policy from the fleet: held from now on if the held one's roots admit it."""
        if not raw:
            return  # the retained policy was cleared: keep holding the one we have
        held = self._trust.policy
        try:
            new = self._trust.update(raw, self.trusted_now())
        except WireError as err:
            self.counts[f"policy_rejected.{err.reason.value}"] += 1
            self.metrics.policies.labels(outcome=err.reason.value).inc()
            self._log.warning(
                "trust_policy_rejected",
                reason=err.reason.value,
                detail=err.detail,
                held_version=held.version if held else None,
            )
            return
        if new is None:
            return  # the retained copy of the policy already held, redelivered on connect
        await self._record(self._jobs.save_policy, new.version, new.raw)
        self.counts["policy_accepted"] += 1
        self.metrics.policies.labels(outcome="accepted").inc()
        self.metrics.policy_version.set(new.version)
        self._log.info(
            "trust_policy_updated",
            version=new.version,
            previous=held.version if held else None,
            expires_at=new.policy.expires_at,
            job_keys=len(new.policy.job_keys),
        )
        self._status_dirty.set()

    async def handle_job_message(self, raw: bytes) -> None:
        """Verify, parse and admit one job message; accept, hand back, or reject it."""
        self._outstanding = max(0, self._outstanding - 1)
        job: JobSpec | None = None
        stage = "parse"
        try:
            limit = self.config.agent.max_message_bytes
            if is_bundle(raw):  # a job with large inputs: signed header, then raw tensors
                verified, job = verify_job_bundle(raw, trusted=self._trust.ring, max_bytes=limit)
            else:
                verified = envelope.verify(
                    raw, payload_type=envelope.JOB_TYPE, trusted=self._trust.ring, max_bytes=limit
                )
                job = parse_model(
                    verified.payload, JobSpec, what="job", reason=Reason.MALFORMED_PAYLOAD
                )
            stage = "admit"
            self._trust.authorize(job, verified.keyid, self.trusted_now())
            owner = self.config.owner
            ctx = AdmissionContext(
                vehicle_id=self.vehicle_id,
                now=self.trusted_now(),
                max_clock_skew_s=self.config.agent.max_clock_skew_s,
                max_input_bytes=self.config.agent.max_input_bytes,
                seen=self._seen,
                models=self._store.held,
                accepted_issuers=frozenset(owner.accepted_issuers),
                accepted_classes=frozenset(owner.accepted_job_classes),
            )
            model = admit(job, verified.keyid, ctx)
        except WireError as err:
            await self._event(job, EventKind.REJECTED, err.reason.value, err.detail)
            return
        except Exception as exc:  # one message never ends the daemon
            await self._intake_failed(job, stage, exc)
            return
        try:
            await self._take(job, model, verified.digest)
        except Exception as exc:
            if (job.job_id, job.attempt) in self._held:
                self._log.exception("job_intake_failed_after_accept", job_id=job.job_id)
            else:
                await self._intake_failed(job, "accept", exc)
        self._wake_requester.set()

    async def _intake_failed(self, job: JobSpec | None, stage: str, exc: Exception) -> None:
        """A fault of the agent's own while taking a job in: the job is refused, typed."""
        self._log.exception("job_intake_failed", stage=stage, job_id=job.job_id if job else None)
        await self._event(
            job,
            EventKind.REJECTED,
            Reason.AGENT_ERROR.value,
            f"the agent failed at {stage}: {type(exc).__name__}: {exc}",
        )

    async def _take(self, job: JobSpec, model: HeldModel, digest: str) -> None:
        """Record a verified, admitted job, then accept it or hand it back."""
        self._seen[(job.job_id, job.attempt)] = job.expires_at
        floor = raised_floor(self._clock_floor, job.issued_at, self._clock())
        self._clock_floor = floor
        poisoned = self._worker_crashes[job.job_id] >= MAX_WORKER_CRASHES
        accept = (
            not poisoned and self.gate.is_open and not self._stopping and not self._queue.full()
        )
        # Durable before anything is acted on: a replay after a crash is still caught.
        recorded = await self._record(
            self._jobs.remember,
            job.job_id,
            job.attempt,
            job.expires_at,
            accepted=accept,
            now=self._clock(),
            clock_floor=floor,
        )
        if not recorded:  # not durably recorded, so not run: the fleet sends it elsewhere
            await self._event(
                job,
                EventKind.RELEASED,
                GateReason.STATE_DISK.value,
                "the state disk refuses writes; the job was not recorded and is not run here",
            )
        elif poisoned:
            await self._event(
                job,
                EventKind.REJECTED,
                Reason.POISON_JOB.value,
                "this job killed the worker twice before; not run here again",
            )
        elif not self.gate.is_open or self._stopping:
            await self._event(
                job, EventKind.RELEASED, Reason.GATE_CLOSED.value, "vehicle not eligible now"
            )
        elif self._queue.full():
            await self._event(job, EventKind.RELEASED, Reason.BUSY.value, "no free slot")
        else:
            self._queue.put_nowait(AcceptedJob(job, model, digest))
            self._held[(job.job_id, job.attempt)] = job
            await self._event(job, EventKind.ACCEPTED)
            await self._stage_next()

    # ---- running ----------------------------------------------------------

    async def _execute(self) -> None:
        while True:
            self._executor_idle.set()
            item = await self._queue.get()
            self._executor_idle.clear()
            try:
                await self._execute_one(item)
            except Exception as exc:  # one job never ends the daemon: it fails, typed
                self._log.exception("job_handling_failed", job_id=item.job.job_id)
                await self._event_soon(
                    item.job,
                    EventKind.FAILED,
                    Reason.AGENT_ERROR.value,
                    f"the agent failed running this job: {type(exc).__name__}: {exc}",
                )
            finally:
                self._held.pop((item.job.job_id, item.job.attempt), None)

    async def _execute_one(self, item: AcceptedJob) -> None:
        if not self.gate.is_open or self._stopping:
            if self._engine.has_work:
                self._engine.kill()  # this job may have been staged: it must not compute
            reason = Reason.GATE_CLOSED.value if not self.gate.is_open else "shutdown"
            if self._energy_job == (item.job.job_id, item.job.attempt):  # it was staged
                await self._close_energy(item, "released")
                self._energy_job = None
            await self._record(self._jobs.finish, item.job.job_id, item.job.attempt)
            await self._event_soon(item.job, EventKind.RELEASED, reason, "not started")
            return
        key = (item.job.job_id, item.job.attempt)
        if self._energy_job != key:  # not already computing (staged behind the last job)
            self._energy_boundary(self._energy_job)
            self._energy_job = key
        run = asyncio.create_task(self._run_job(item), name=f"job:{item.job.job_id}")
        self._current = (item, run)
        self._job_running.set()
        try:
            await asyncio.wait({run})
        finally:
            if not run.done():
                run.cancel()
            self._current = None
            self._preempted = None
            self._job_running.clear()
        if run.cancelled():
            await self._close_energy(item, "preempted")
            self._energy_job = None  # the worker was killed: nothing computes now
            await self._record(self._jobs.finish, item.job.job_id, item.job.attempt)
        elif (exc := run.exception()) is not None:
            self._log.error("job_crashed", job_id=item.job.job_id, error=repr(exc))
            await self._close_energy(item, "failed")
            await self._record(self._jobs.finish, item.job.job_id, item.job.attempt)
            await self._event_soon(
                item.job,
                EventKind.FAILED,
                Reason.AGENT_ERROR.value,
                f"the agent failed running this job: {type(exc).__name__}: {exc}",
            )
        if run.cancelled():
            await self._event_soon(
                item.job,
                EventKind.PREEMPTED,
                self._preempt_reason,
                "compute stopped; job handed back",
            )
        self._energy_booked.discard((item.job.job_id, item.job.attempt))
        self._wake_requester.set()

    async def _run_job(self, item: AcceptedJob) -> None:
        job = item.job
        started = time.perf_counter()
        # Compute starts first; the journal entry and the running event follow while it runs,
        # so the worker does not wait on a disk write and a broker round trip between jobs.
        compute = asyncio.ensure_future(
            self._engine.run(
                item.model,
                self._store.path_of(item.model),
                job.inputs,
                deadline_s=job.limits.max_runtime_s,
                key=_request_key(job),
            )
        )
        try:
            await asyncio.sleep(0)  # let the run write its request (or find it staged)
            await self._stage_next()  # before the journal: its write may queue behind sealing
            await self._record(self._jobs.mark, job.job_id, job.attempt, "running", self._clock())
            await self._event_soon(job, EventKind.RUNNING)
            await asyncio.wait({compute})
        except BaseException:  # cancelled: preempted, or the agent is stopping
            compute.cancel()
            with contextlib.suppress(asyncio.CancelledError, WireError):
                await compute
            raise
        try:
            outputs = compute.result()
        except WireError as err:
            if self._preempted is item:
                # We killed its worker. Our cancellation can be lost on the way (Python 3.11's
                # wait_for, inside aiomqtt's publish, returns a result that arrived with it),
                # but the job was preempted, not crashed: never a strike towards poison.
                raise asyncio.CancelledError from None
            if err.reason in (Reason.WORKER_KILLED, Reason.WORKER_UNAVAILABLE):
                # Not the job's fault: handed back, no strike, no attempt used at the fleet.
                await self._close_energy(item, "released")
                await self._record(self._jobs.finish, job.job_id, job.attempt)
                await self._event_soon(
                    job, EventKind.RELEASED, err.reason.value, f"{err.detail}; job handed back"
                )
                return
            detail = err.detail
            if err.reason in (Reason.WORKER_CRASHED, Reason.MEMORY_LIMIT):
                self._worker_crashes[job.job_id] += 1
                if self._worker_crashes[job.job_id] >= MAX_WORKER_CRASHES:
                    detail += "; this job has now killed the worker twice and is not run here again"
            await self._close_energy(item, "failed")
            await self._record(self._jobs.finish, job.job_id, job.attempt)
            await self._event_soon(job, EventKind.FAILED, err.reason.value, detail)
            return
        runtime_ms = (time.perf_counter() - started) * 1000
        self.metrics.job_seconds.observe(runtime_ms / 1000)
        energy_wh = self._book_energy(item)
        # Compute is done: sealing and publishing overlap with the next job's compute.
        await self._deliveries.put(_Finished(item, outputs, runtime_ms, energy_wh))

    async def _stage_next(self) -> None:
        """Hand the worker the next queued job behind the running one, so it starts the moment
        the worker is free (engine.stage); only while the gate is open."""
        if self._current is None or not self.gate.is_open or self._stopping or self._queue.empty():
            return
        nxt: AcceptedJob = self._queue._queue[0]  # type: ignore[attr-defined] # peek, not take
        await self._engine.stage(
            _request_key(nxt.job), nxt.model, self._store.path_of(nxt.model), nxt.job.inputs
        )

    async def _deliver_results(self) -> None:
        """Seal, sign and file finished jobs, in order, off the executor's path."""
        while True:
            done = await self._deliveries.get()
            try:
                if self._unfiled:  # the disk is refusing: keep the order, file them together
                    self._unfiled.append(done)
                else:
                    await self._file(done)
            finally:
                self._deliveries.task_done()

    async def _send_outbox(self, client: aiomqtt.Client) -> None:
        """Publish the outbox in order; a row goes only once the broker acknowledged it."""
        while True:
            if self._state_fault is not None:  # rows cannot be removed once sent: wait
                await asyncio.sleep(STATE_PROBE_EVERY_S)
                continue
            damaged = self._jobs.damaged
            try:
                batch = await self._io(self._jobs.outbox_batch)
            except Exception as exc:
                if not is_storage_error(exc):
                    raise
                self._state_failed(exc, "reading the outbox")
                continue
            if self._jobs.damaged > damaged:
                lost = self._jobs.damaged - damaged
                self._outbox_depth = max(0, self._outbox_depth - lost)
                self._log.error(
                    "outbox_entries_damaged",
                    dropped=lost,
                    why="result file missing or cut short (power loss?); the fleet's lease "
                    "expiry sends those jobs elsewhere",
                )
            if not batch:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
                continue
            for seq, topic_name, payload, job_id, attempt in batch:
                try:
                    await publish_acked(client, topic_name, payload)
                except aiomqtt.MqttError:
                    raise  # the connection: the row stays and goes on the next one
                except Exception as exc:  # this result only: it fails, the others go on
                    self._log.exception("result_not_published", job_id=job_id, attempt=attempt)
                    if await self._record(self._jobs.outbox_remove, seq):
                        self._outbox_depth = max(0, self._outbox_depth - 1)
                    await self._event_for(
                        (job_id, attempt),
                        EventKind.FAILED,
                        Reason.AGENT_ERROR.value,
                        f"publishing the result failed: {type(exc).__name__}: {exc}",
                    )
                    continue
                if not await self._record(self._jobs.outbox_remove, seq):
                    break  # sent, not yet removed: the collector drops the duplicate later
                self._outbox_depth = max(0, self._outbox_depth - 1)
                # "succeeded" once the broker holds the result, not before.
                self.counts[EventKind.SUCCEEDED.value] += 1
                self.metrics.jobs.labels(kind="succeeded", reason="").inc()
                self.metrics.outbox.set(self._outbox_depth)
                self._log.info("job_succeeded", job_id=job_id, attempt=attempt)
                event = JobEvent(
                    vehicle_id=self.vehicle_id,
                    job_id=job_id,
                    attempt=attempt,
                    kind=EventKind.SUCCEEDED,
                    at=self._clock(),
                )
                await publish_acked(
                    client, topic(self.vehicle_id, Channel.EVENTS), dump_model(event)
                )
            self._wake_requester.set()

    async def _heartbeat(self, client: aiomqtt.Client) -> None:
        """Tell the dispatcher every heartbeat_s which jobs this vehicle still holds."""
        while True:
            await asyncio.sleep(self.config.agent.heartbeat_s)
            for job in list(self._held.values()):
                event = JobEvent(
                    vehicle_id=self.vehicle_id,
                    job_id=job.job_id,
                    attempt=job.attempt,
                    kind=EventKind.HEARTBEAT,
                    at=self._clock(),
                )
                await publish_acked(
                    client, topic(self.vehicle_id, Channel.EVENTS), dump_model(event)
                )

    async def _report_interrupted(self) -> None:
        """Hand back the jobs a previous run accepted and never finished (once, on connect)."""
        interrupted, self._interrupted = self._interrupted, []
        for job_id, attempt, state in interrupted:
            self.counts["released:agent_restarted"] += 1
            self._log.warning(
                "job_interrupted_by_restart", job_id=job_id, attempt=attempt, state=state
            )
            event = JobEvent(
                vehicle_id=self.vehicle_id,
                job_id=job_id,
                attempt=attempt,
                kind=EventKind.RELEASED,
                reason="agent_restarted",
                detail=f"the agent restarted while the job was {state}",
                at=self._clock(),
            )
            await self._publish(topic(self.vehicle_id, Channel.EVENTS), dump_model(event))
            await self._record(self._jobs.finish, job_id, attempt)

    def _energy_boundary(self, job: tuple[str, int] | None) -> None:
        """A sample at a job's start or end: the interval up to now is booked to `job`, with
        the worker's load measured up to this instant (the window closes here)."""
        now = self._clock()
        self._load_window_closes = True
        snap = self._vehicle.snapshot(now)
        self.last_snapshot = snap
        self.energy.sample(
            now,
            snap.compute_power_w,
            self._local(now).date().isoformat(),
            job,
            snap.compute_energy_j,
        )

    def _book_energy(self, item: AcceptedJob) -> float:
        """Close the job's energy account at its end: what ran up to now is booked to it, and
        what runs from now on to the job staged behind it, if the worker is already on it."""
        key = (item.job.job_id, item.job.attempt)
        if key in self._energy_booked:
            return self.energy.job_wh(key)
        self._energy_booked.add(key)
        self._energy_boundary(key)
        nxt = self._engine.computing
        self._energy_job = None
        if nxt is not None and nxt != _request_key(item.job):
            job_id, _, attempt = nxt.rpartition("#")
            self._energy_job = (job_id, int(attempt))
        return self.energy.close_job(key)

    async def _record_energy(self, item: AcceptedJob, wh: float, outcome: str) -> None:
        job = item.job
        await self._record(
            self._ledger.record_job,
            job.job_id,
            job.attempt,
            self.energy.day,
            wh,
            self._clock(),
            outcome,
            self.energy.today_wh,
        )

    async def _close_energy(self, item: AcceptedJob, outcome: str) -> float:
        """Book and record the energy of a job that ended without a result."""
        wh = self._book_energy(item)
        await self._record_energy(item, wh, outcome)
        return wh

    def _file_result(self, done: _Finished, day: str, day_wh: float) -> None:
        """On the I/O thread, in one go: seal and sign the job's result, book its energy, and
        put the result in the outbox as its journal entry closes. Sealing comes first: a
        result that cannot be sealed leaves no `succeeded` row behind."""
        job = done.item.job
        sealed = self._seal(done.item, done.outputs, done.runtime_ms, done.energy_wh)
        self._ledger.record_job(
            job.job_id, job.attempt, day, done.energy_wh, self._clock(), "succeeded", day_wh
        )
        self._jobs.finish_with_result(
            job.job_id,
            job.attempt,
            topic(self.vehicle_id, Channel.RESULTS),
            sealed,
            self._clock(),
        )

    def _seal(
        self, item: AcceptedJob, outputs: dict[str, Tensor], runtime_ms: float, energy_wh: float
    ) -> bytes:
        job = item.job
        body = ResultBody(
            job_id=job.job_id,
            attempt=job.attempt,
            vehicle_id=self.vehicle_id,
            model_sha256=item.model.sha256,
            outputs=outputs,
            runtime_ms=runtime_ms,
            finished_at=self._clock(),
            energy_wh=energy_wh,
        )
        info = result_info(job.job_id, job.attempt, self.vehicle_id, item.digest)
        try:
            requester = sealable_x25519_public(job.requester_key)
        except ValueError as exc:  # admission refuses these: this is the last line of defence
            raise WireError(Reason.BAD_REQUESTER_KEY, str(exc)) from None
        ciphertext = seal(encode_result_body(body), requester, info)
        sealed = SealedResult(
            job_id=job.job_id,
            attempt=job.attempt,
            vehicle_id=self.vehicle_id,
            job_digest=item.digest,
            suite=SUITE,
            ciphertext=ciphertext,
        )
        return sign_result(sealed, self._key)

    # ---- out --------------------------------------------------------------

    async def _publish(self, topic_name: str, payload: bytes) -> None:
        """Publish at QoS 1, waiting through disconnections until the broker acknowledges."""
        while True:
            await self._connected.wait()
            client = self._client
            if client is None:
                await asyncio.sleep(0.05)
                continue
            try:
                await publish_acked(client, topic_name, payload)
            except aiomqtt.MqttError as exc:
                self._log.warning("publish_retry", topic=topic_name, reason=str(exc))
                await asyncio.sleep(0.2)
            else:
                return

    async def _event(
        self, job: JobSpec | None, kind: EventKind, reason: str | None = None, detail: str = ""
    ) -> None:
        await self._event_for((job.job_id, job.attempt) if job else None, kind, reason, detail)

    async def _event_for(
        self,
        job: tuple[str, int] | None,
        kind: EventKind,
        reason: str | None = None,
        detail: str = "",
    ) -> None:
        """One happening of a job (known by its id and attempt, or none): counted, measured,
        logged, and published on the events topic."""
        self.counts[kind.value] += 1
        self.metrics.jobs.labels(kind=kind.value, reason=reason or "").inc()
        if reason:
            self.counts[f"{kind.value}:{reason}"] += 1
        ids = {"job_id": job[0], "attempt": job[1]} if job else {}
        level = "warning" if kind in (EventKind.REJECTED, EventKind.FAILED) else "info"
        getattr(self._log, level)(f"job_{kind.value}", reason=reason, detail=detail or None, **ids)
        event = JobEvent(
            vehicle_id=self.vehicle_id,
            kind=kind,
            reason=reason,
            detail=detail[:500],
            at=self._clock(),
            **ids,  # type: ignore[arg-type]
        )
        await self._publish(topic(self.vehicle_id, Channel.EVENTS), dump_model(event))

    async def _event_soon(
        self, job: JobSpec, kind: EventKind, reason: str | None = None, detail: str = ""
    ) -> None:
        """An event that must not hold up compute or shutdown for long if the broker is away."""
        try:
            async with asyncio.timeout(5.0):
                await self._event(job, kind, reason, detail)
        except TimeoutError:
            self._log.warning("event_not_sent", job_id=job.job_id, kind=kind.value)
