"""Alembic is the only thing that makes the schema: after `upgrade` it must equal the ORM's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from deltafleet.server.store import (
    alembic_config,
    current_revision,
    head_revision,
    make_engine,
    migrations_dir,
    upgrade,
)
from deltafleet.server.store.models import Base


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/fleet.db"
    return str(request.getfixturevalue("pg_url"))


def drift(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()


def test_upgraded_schema_matches_the_orm_models(db_url: str) -> None:
    upgrade(db_url)
    assert drift(db_url) == []


def test_downgrade_to_base_then_upgrade_round_trips(db_url: str) -> None:
    upgrade(db_url)
    command.downgrade(alembic_config(db_url), "base")
    assert current_revision(db_url) is None
    engine = make_engine(db_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    upgrade(db_url)
    assert current_revision(db_url) == head_revision()
    assert drift(db_url) == []


def test_version_scripts_do_not_import_the_orm_models() -> None:
    scripts = sorted((migrations_dir() / "versions").glob("*.py"))
    assert scripts
    for script in scripts:
        text = script.read_text()
        assert not re.search(r"^\s*(from|import)\s+deltafleet", text, re.M), script.name
