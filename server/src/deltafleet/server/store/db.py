"""Engines, sessions and the Alembic entry points.

Alembic migrations are the only way the schema is made: ``upgrade`` runs them to head and
``check_schema`` refuses to work on a database that is not at head.

SQLite (the default, one file under ``$FLEET_HOME``) runs in WAL mode with foreign keys on and a
30 s busy timeout. Every SQLite write transaction (``Store.session()``) starts with ``BEGIN
IMMEDIATE``: it takes the write lock up front, so writers are serialised and a read-then-write
transaction can never fail with "database is locked" while upgrading its lock (pysqlite's
default would not even begin a transaction before the first write, so reads were not
isolated). A read (``Store.read()``) starts with a plain ``BEGIN``: in WAL mode it reads one
consistent snapshot and never waits for, or holds, the write lock; it refuses to write and is
rolled back at its end. Keep write transactions short: a reader never waits on them, the
other writers do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.orm import Session, sessionmaker

from deltafleet.shared import one_line

from ..errors import StoreError, UsageError
from ..reads import migrations_dir  # noqa: F401 - its home is the light reads module

if TYPE_CHECKING:  # alembic loads only when a migration or schema check needs it
    from alembic.config import Config

SQLITE_BUSY_TIMEOUT_MS = 30_000
NOT_INITIALISED = "database is not initialised; run `fleetctl init`"
READ_ONLY_OPTION = "deltafleet_read_only"


def _one_line(e: BaseException) -> str:
    return one_line(getattr(e, "orig", None) or e)


def _sqlite_file(url: URL) -> Path | None:
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        return None
    return Path(database)


def parse_url(url: str | URL) -> URL:
    """Parse a database URL; UsageError unless it is SQLite or PostgreSQL.

    A plain ``postgresql://`` URL means the psycopg 3 driver (the one deltafleet ships with).
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UsageError(  # the URL itself is not echoed: it may hold a password
            "invalid database URL: use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
        ) from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise UsageError(f"unsupported database {backend!r}: use SQLite or PostgreSQL")
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def safe_url(url: str | URL) -> str:
    """The URL with its password masked, for printing."""
    return parse_url(url).render_as_string(hide_password=True)


def make_engine(url: str | URL, *, sqlite_foreign_keys: bool = True) -> Engine:
    """Create an engine with deltafleet's connection settings.

    ``sqlite_foreign_keys=False`` is only for migrations: a batch migration rebuilds a table
    by copy-and-drop, and with foreign keys on SQLite would cascade the drop to child rows.
    """
    url = parse_url(url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    path = _sqlite_file(url)
    if path is not None:
        path.expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see "begin" below)
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA foreign_keys={'ON' if sqlite_foreign_keys else 'OFF'}")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        read = conn.get_execution_options().get(READ_ONLY_OPTION)
        conn.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")

    return engine


class Store:
    """An engine plus a session factory. Use ``with store.session() as s:`` for one transaction."""

    def __init__(self, url_or_engine: str | URL | Engine) -> None:
        self.engine = (
            url_or_engine if isinstance(url_or_engine, Engine) else make_engine(url_or_engine)
        )
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """One write transaction: committed when the block succeeds, rolled back when it raises.

        Driver errors (database unreachable, locked, ...) surface as StoreError.
        """
        with self._transaction(read_only=False) as session:
            yield session

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """One read-only transaction: never takes the SQLite write lock (a plain ``BEGIN`` in
        WAL mode), refuses to flush changes, and is rolled back at its end."""
        with self._transaction(read_only=True) as session:
            yield session

    @contextlib.contextmanager
    def _transaction(self, *, read_only: bool) -> Iterator[Session]:
        session = self._sessions()
        if read_only:
            session.info["read_only"] = True
        try:
            if read_only:
                session.connection(execution_options={READ_ONLY_OPTION: True})
            yield session
            if read_only:
                session.rollback()
            else:
                session.commit()
        except DBAPIError as e:
            with contextlib.suppress(SQLAlchemyError):
                session.rollback()
            if e.connection_invalidated or isinstance(e, OperationalError | InterfaceError):
                raise StoreError(f"database error: {_one_line(e)}") from e
            raise
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dispose()


def alembic_config(url: str | URL) -> Config:
    """An Alembic Config built in code (no alembic.ini)."""
    from alembic.config import Config  # noqa: PLC0415

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    rendered = parse_url(url).render_as_string(hide_password=False)
    cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory  # noqa: PLC0415

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return script.get_current_head()


def _current_heads(engine: Engine) -> tuple[str, ...]:
    from alembic.runtime.migration import MigrationContext  # noqa: PLC0415

    with engine.connect() as conn:
        return tuple(MigrationContext.configure(conn).get_current_heads())


def current_revision(url: str | URL | Engine) -> str | None:
    """The revision the database is at (None for an empty or missing database)."""
    if not isinstance(url, Engine):
        path = _sqlite_file(parse_url(url))
        if path is not None and not path.exists():
            return None
    engine = url if isinstance(url, Engine) else make_engine(url)
    try:
        heads = _current_heads(engine)
    except SQLAlchemyError as e:
        raise StoreError(f"cannot read the database schema version: {_one_line(e)}") from e
    finally:
        if not isinstance(url, Engine):
            engine.dispose()
    return heads[0] if heads else None


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Run the Alembic migrations up to ``revision`` (head by default)."""
    from alembic import command  # noqa: PLC0415

    engine = make_engine(url, sqlite_foreign_keys=False)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except SQLAlchemyError as e:
        raise StoreError(f"migration failed: {_one_line(e)}") from e
    finally:
        engine.dispose()


def check_schema(url: str | URL | Engine) -> None:
    """Raise UsageError unless the database exists and its schema is at head.

    A missing SQLite file is reported as not initialised and is not created.
    """
    from alembic.script import ScriptDirectory  # noqa: PLC0415

    current = current_revision(url)
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    head = script.get_current_head()
    if current is None:
        raise UsageError(NOT_INITIALISED)
    if current == head:
        return
    try:
        script.get_revision(current)
    except Exception as e:  # alembic raises several kinds for an unknown revision
        raise UsageError(
            f"database schema revision {current} is newer than this fleetctl; "
            "upgrade deltafleet-server"
        ) from e
    if current != head:
        raise UsageError(
            f"database schema is at revision {current}, this fleetctl needs {head}; "
            "run `fleetctl db upgrade`"
        )
