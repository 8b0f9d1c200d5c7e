"""A server home for benchmarks that drive ``FleetServer`` or the controller in-process with no
broker: config (an MQTT URL nothing listens on, a fresh topic prefix), an SQLite store at the
schema's head, a signing key and the blob store."""

from __future__ import annotations

import uuid
from pathlib import Path

from deltafleet.server.config import ServerConfig
from deltafleet.server.store import BlobStore, Store, upgrade
from deltafleet.shared import SigningKey


def offline_store(root: Path) -> tuple[ServerConfig, Store, BlobStore]:
    cfg = ServerConfig(home=root / "home", db_url=f"sqlite:///{root}/fleet.db",
                       mqtt_url="mqtt://127.0.0.1:1", topic_prefix=f"b{uuid.uuid4().hex[:8]}/v1")
    upgrade(cfg.db_url)
    SigningKey.generate().save(cfg.signing_key_path, cfg.public_key_path)
    return cfg, Store(cfg.db_url), BlobStore(cfg.blobs_dir)
