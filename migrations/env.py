"""Alembic environment for deltafleet (no alembic.ini: the Config is built in code).

The URL comes from the Config's ``sqlalchemy.url`` main option. A caller may pass an open
connection through ``config.attributes["connection"]``; it is reused as is. ``target_metadata``
is only used by autogenerate; version scripts never import the ORM models.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from deltafleet.server.store.db import make_engine
from deltafleet.server.store.models import Base

config = context.config
target_metadata = Base.metadata


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url")
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=bool(url and url.startswith("sqlite")),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("sqlalchemy.url is not set in the Alembic config")
    engine = make_engine(url, sqlite_foreign_keys=False)
    try:
        with engine.begin() as conn:
            _configure_and_run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
