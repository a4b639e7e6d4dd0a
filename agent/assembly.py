"""Builds a ready-to-run Agent from a validated config: vehicle, keys, models, engine, state."""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from agent.config import AgentConfig
from agent.core.trust import Trust
from agent.daemon import Agent
from agent.inference.engine import WorkerEngine
from agent.inference.store import ModelStore, ModelStoreError
from agent.kit.credentials import CredentialError
from agent.kit.keyfiles import KeyFileError, load_key_ring, load_signing_key
from agent.kit.logs import get_logger
from agent.kit.mqtt import client_tls
from agent.state.jobs import JobStore
from agent.state.ledger import EnergyLedger, StateError
from agent.vehicle.emulated import EmulatedVehicle
from agent.vehicle.host import HostVehicle, discover_power
from agent.vehicle.scenario import Scenario, ScenarioError, load_scenario
from agent.vehicle.sensors import SensorError
from agent.vehicle.sensors.mains import MainsSupply
from agent.vehicle.sensors.thermal import HottestZone
from agent.vehicle.snapshot import VehicleSignals
from agent.wire.errors import WireError


class StartupError(Exception):
    """Raised when the agent cannot start: a key, the trusted keys, a scenario, sensors, models or state."""


def check_file_permissions(path: Path, what: str, *, secret: bool) -> None:
    """Refuse a file others could change (or, for a secret, read): StartupError saying the fix.

    Files in systemd's credentials folder pass: systemd made them read-only, and only this
    service can enter that folder (systemd 257 gives them mode 440 with the service's group).
    """
    handed = os.environ.get("CREDENTIALS_DIRECTORY")
    if handed and path.resolve().is_relative_to(Path(handed).resolve()):
        return
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return  # a missing file is reported by whatever reads it, with its own message
    if mode & 0o022:
        raise StartupError(
            f"{what} {path} is writable by group or others (mode {mode:o}); "
            f"fix it with: chmod go-w {path}"
        )
    if secret and mode & 0o044:
        raise StartupError(
            f"{what} {path} is readable by group or others (mode {mode:o}); "
            f"fix it with: chmod 600 {path}"
        )


def build_vehicle(config: AgentConfig, emulated: EmulatedVehicle) -> VehicleSignals:
    """The emulated car, or a rig's host sensors over it (vehicle.source = "host")."""
    if config.vehicle.source == "emulated":
        return emulated
    root = config.sensors.sysfs_root
    try:
        thermal = HottestZone(root)
    except SensorError as exc:
        raise StartupError(f"vehicle.source = 'host' needs a thermal zone: {exc}") from None
    try:
        mains: MainsSupply | None = MainsSupply(root)
    except SensorError:
        mains = None  # a bench supply with no power_supply class: charging comes from the scenario
    try:
        power = discover_power(root, config.sensors.power, config.sensors.vcgencmd)
    except SensorError as exc:
        raise StartupError(f"sensors.power = {config.sensors.power!r}: {exc}") from None
    return HostVehicle(
        emulated,
        thermal=thermal,
        mains=mains,
        power=power,
        compute_max_w=config.sensors.compute_max_w,
    )


def build_trust(config: AgentConfig, jobs: JobStore, now: float) -> Trust:
    """The trust policy (installed file, or the newer one kept in the state database), or the
    fixed key list of a bench rig."""
    keys = config.keys
    if keys.trusted_job_keys is not None:
        ring = load_key_ring(keys.trusted_job_keys)
        if len(ring) == 0:
            raise StartupError(f"{keys.trusted_job_keys} lists no job-signing key")
        return Trust(ring=ring)
    assert keys.trust_policy is not None  # the config's validator demands one of the two
    try:
        installed = keys.trust_policy.read_bytes()
    except OSError as exc:
        raise StartupError(
            f"cannot read the trust policy {keys.trust_policy}: {exc.strerror}; install the "
            "fleet's signed policy there (`edge-fleet policy sign`)"
        ) from None
    try:
        trust, source = Trust.from_policy(installed, jobs.held_policy(), now)
    except WireError as exc:
        raise StartupError(
            f"the trust policy {keys.trust_policy} cannot be used ({exc.reason.value}): "
            f"{exc.detail}"
        ) from None
    held = trust.policy
    assert held is not None
    get_logger(vehicle_id=config.vehicle.id).info(
        "trust_policy_loaded",
        version=held.version,
        source=source,
        expired=not trust.valid(now),
        job_keys=len(held.policy.job_keys),
        requesters=len(held.policy.requester_keys),
    )
    return trust


def build_agent(config: AgentConfig, *, clock: Callable[[], float] = time.time) -> Agent:
    check_file_permissions(config.keys.vehicle_key, "the vehicle key", secret=True)
    for anchor in (config.keys.trusted_job_keys, config.keys.trust_policy):
        if anchor is not None:
            check_file_permissions(anchor, "the trust anchor", secret=False)
    if config.broker.key_file is not None:
        check_file_permissions(config.broker.key_file, "the TLS key", secret=True)
    try:
        signing_key = load_signing_key(config.keys.vehicle_key)
        scenario = load_scenario(config.vehicle.scenario) if config.vehicle.scenario else Scenario()
        ledger = EnergyLedger(config.state.dir / "state.db")
        jobs = JobStore(config.state.dir / "state.db")
        store = ModelStore.open(
            config.models.dir,
            installed=config.state.dir / "models",
            allowed_domains=frozenset(config.models.allowed_domains),
            max_bytes=config.models.max_bytes,
        )
        trust = build_trust(config, jobs, clock())
    except (KeyFileError, ScenarioError, ModelStoreError, StateError) as exc:
        raise StartupError(str(exc)) from None
    tls = None
    b = config.broker
    if b.tls:
        try:  # the config's validator guarantees the CA (and the pair, without a login)
            tls = client_tls(b.ca_file, b.cert_file, b.key_file)  # type: ignore[arg-type]
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(
                f"broker TLS files ({b.ca_file}, {b.cert_file}, {b.key_file}) cannot be used: "
                f"{exc}; provision them with `edge-fleet provision`"
            ) from None
    try:
        b.login()  # read now so that a missing or unsafe password file stops the start
    except CredentialError as exc:
        raise StartupError(str(exc)) from None
    emulated = EmulatedVehicle(scenario, started_at=clock(), time_scale=config.vehicle.time_scale)
    agent = Agent(
        config,
        vehicle=build_vehicle(config, emulated),
        engine=WorkerEngine(
            threads=config.agent.intra_op_threads,
            memory_mb=config.agent.worker_memory_mb,
            idle_s=config.agent.worker_idle_s,
            providers=config.agent.execution_providers,
        ),
        store=store,
        signing_key=signing_key,
        trust=trust,
        ledger=ledger,
        jobs=jobs,
        clock=clock,
        tls=tls,
    )
    emulated.attach_load(agent.compute_load, agent.compute_busy_s)
    return agent
