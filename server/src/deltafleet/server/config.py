"""Server configuration: one frozen object built from the environment, passed to constructors."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "~/.local/share/deltafleet"
DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"
DEFAULT_TOPIC_PREFIX = "deltafleet/v1"


@dataclass(frozen=True)
class ServerConfig:
    """Where the server keeps its state and how it reaches the broker.

    ``home`` holds the SQLite database (unless ``db_url`` points elsewhere), the blob store and
    the signing keys.
    """

    home: Path
    db_url: str
    mqtt_url: str
    topic_prefix: str
    chunk_size_bytes: int = 65536
    manifest_ttl_s: int = 7 * 86400

    @property
    def blobs_dir(self) -> Path:
        return self.home / "blobs"

    @property
    def signing_key_path(self) -> Path:
        return self.home / "keys" / "signing.key"

    @property
    def public_key_path(self) -> Path:
        return self.home / "keys" / "signing.pub"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerConfig:
        """Read FLEET_HOME, FLEET_DB_URL, FLEET_MQTT_URL and FLEET_TOPIC_PREFIX (empty = unset)."""
        env = os.environ if environ is None else environ
        home = Path(env.get("FLEET_HOME") or DEFAULT_HOME).expanduser().absolute()
        return cls(
            home=home,
            db_url=env.get("FLEET_DB_URL") or f"sqlite:///{home}/fleet.db",
            mqtt_url=env.get("FLEET_MQTT_URL") or DEFAULT_MQTT_URL,
            topic_prefix=env.get("FLEET_TOPIC_PREFIX") or DEFAULT_TOPIC_PREFIX,
        )
