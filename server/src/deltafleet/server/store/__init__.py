"""deltafleet.server.store: the SQL schema, sessions, migrations and the blob store."""

from .blobs import BlobCheck, BlobStore, BlobVerifier
from .db import (
    NOT_INITIALISED,
    Store,
    StoreError,
    alembic_config,
    check_schema,
    current_revision,
    head_revision,
    make_engine,
    migrations_dir,
    safe_url,
    upgrade,
)

__all__ = [
    "NOT_INITIALISED",
    "BlobCheck",
    "BlobStore",
    "BlobVerifier",
    "Store",
    "StoreError",
    "alembic_config",
    "check_schema",
    "current_revision",
    "head_revision",
    "make_engine",
    "migrations_dir",
    "safe_url",
    "upgrade",
]
