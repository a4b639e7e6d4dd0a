"""Builds a ready-to-run Agent from a validated config: vehicle, keys, models, engine."""

from __future__ import annotations

import time
from collections.abc import Callable

from agent.config import AgentConfig
from agent.daemon import Agent
from agent.inference.engine import InProcessEngine
from agent.inference.store import ModelStore, ModelStoreError
from agent.vehicle.emulated import EmulatedVehicle
from agent.vehicle.scenario import Scenario, ScenarioError, load_scenario
from agent.wire.keys import KeyFileError, KeyRing, load_signing_key


class StartupError(Exception):
    """Raised when the agent cannot start: a key, the trusted keys, a scenario or the models."""


def build_agent(config: AgentConfig, *, clock: Callable[[], float] = time.time) -> Agent:
    try:
        signing_key = load_signing_key(config.keys.vehicle_key)
        trusted = KeyRing.load(config.keys.trusted_job_keys)
        scenario = load_scenario(config.vehicle.scenario) if config.vehicle.scenario else Scenario()
        store = ModelStore.open(config.models.dir)
    except (KeyFileError, ScenarioError, ModelStoreError) as exc:
        raise StartupError(str(exc)) from None
    if len(trusted) == 0:
        raise StartupError(f"{config.keys.trusted_job_keys} lists no job-signing key")
    vehicle = EmulatedVehicle(scenario, started_at=clock(), time_scale=config.vehicle.time_scale)
    return Agent(
        config,
        vehicle=vehicle,
        engine=InProcessEngine(intra_op_threads=config.agent.intra_op_threads),
        store=store,
        signing_key=signing_key,
        trusted=trusted,
        clock=clock,
    )
