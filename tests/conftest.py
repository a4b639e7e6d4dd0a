"""Fixtures: a real mosquitto for the session, fresh fleet keys per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.kit import logs
from broker.local import LocalMosquitto
from tests.support import FleetKeys

logs.configure(json=False)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMosquitto]:
    """One real mosquitto on a free loopback port, persistence off, for the whole session."""
    broker = LocalMosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def fleet() -> FleetKeys:
    return FleetKeys()
