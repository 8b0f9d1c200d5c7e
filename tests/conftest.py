"""Shared fixtures: a real Mosquitto per test session, a fresh PostgreSQL database, temp homes.

Under CI=true a missing broker binary or PostgreSQL server fails the run instead of skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.broker import Broker, has_mosquitto
from tests.harness.need import missing

# No automatic benchmark requests unless a test turns them on: tests count published bytes.
os.environ.setdefault("FLEET_AUTO_BENCH_S", "0")

PG_ADMIN_URL = os.environ.get("FLEET_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    if not has_mosquitto():
        missing("the mosquitto binary")
    b = Broker(tmp_path_factory.mktemp("mosquitto"))
    yield b
    b.stop()


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker for one test (for tests that stop it or need a clean retained store)."""
    if not has_mosquitto():
        missing("the mosquitto binary")
    (tmp_path / "broker").mkdir()
    b = Broker(tmp_path / "broker")
    yield b
    b.stop()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    name = f"fleet_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError:
        admin.dispose()
        missing("PostgreSQL at 127.0.0.1:5432")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def fleet_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "fleet-home"
    monkeypatch.setenv("FLEET_HOME", str(home))
    monkeypatch.delenv("FLEET_DB_URL", raising=False)
    return home
