"""Fixtures: a real mosquitto and a real PostgreSQL for the session, fresh fleet keys per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from agent.kit import logs
from broker.local import LocalMosquitto
from broker.local_postgres import LocalPostgres
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


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalPostgres]:
    """One real PostgreSQL cluster on a free loopback port for the whole session; each test
    that needs it takes a fresh database (`pg_dsn`)."""
    with LocalPostgres() as pg:
        yield pg


@pytest.fixture
def pg_dsn(postgres: LocalPostgres) -> str:
    """A new, empty database in the session's PostgreSQL, for this test alone."""
    return postgres.create_database(f"t{uuid.uuid4().hex[:12]}")
