"""Server configuration: one frozen object built from the environment, passed to constructors."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from deltafleet.shared.mqtt import MqttSettings, Will

DEFAULT_HOME = "~/.local/share/deltafleet"
DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"
DEFAULT_TOPIC_PREFIX = "deltafleet/v1"
DEFAULT_SERVER_IDENTITY = "fleet-server"  # CN of the server's MQTT client certificate


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
    # MQTT authentication of the server itself (TLS client certificate and/or user+password).
    # Unset TLS files fall back to $FLEET_HOME/pki/ (made by `fleetctl broker config`) when
    # ``mqtt_url`` is mqtts://.
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    server_identity: str = DEFAULT_SERVER_IDENTITY
    keylist_ttl_s: int = 365 * 86400  # how long a root-signed key list stays valid

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def pki_dir(self) -> Path:
        return self.home / "pki"

    @property
    def revoked_path(self) -> Path:
        """Server-side deny list of revoked device ids (`fleetctl device revoke`)."""
        return self.home / "revoked.json"

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
        """Read FLEET_HOME, FLEET_DB_URL, FLEET_MQTT_URL, FLEET_TOPIC_PREFIX, FLEET_MQTT_CA,
        FLEET_MQTT_CERT, FLEET_MQTT_KEY, FLEET_MQTT_USERNAME, FLEET_MQTT_PASSWORD and
        FLEET_MQTT_IDENTITY (empty = unset)."""
        env = os.environ if environ is None else environ
        home = Path(env.get("FLEET_HOME") or DEFAULT_HOME).expanduser().absolute()

        def path(var: str) -> Path | None:
            value = env.get(var)
            return Path(value).expanduser().absolute() if value else None

        return cls(
            home=home,
            db_url=env.get("FLEET_DB_URL") or f"sqlite:///{home}/fleet.db",
            mqtt_url=env.get("FLEET_MQTT_URL") or DEFAULT_MQTT_URL,
            topic_prefix=env.get("FLEET_TOPIC_PREFIX") or DEFAULT_TOPIC_PREFIX,
            mqtt_ca_file=path("FLEET_MQTT_CA"),
            mqtt_cert_file=path("FLEET_MQTT_CERT"),
            mqtt_key_file=path("FLEET_MQTT_KEY"),
            mqtt_username=env.get("FLEET_MQTT_USERNAME") or None,
            mqtt_password=env.get("FLEET_MQTT_PASSWORD") or None,
            server_identity=env.get("FLEET_MQTT_IDENTITY") or DEFAULT_SERVER_IDENTITY,
        )


def mqtt_settings(cfg: ServerConfig, client_id: str, will: Will | None) -> MqttSettings:
    """The server's MqttSettings: URL, last will and its credentials.

    With an mqtts:// URL, TLS files not set in the environment default to the server identity
    made by `fleetctl broker config` under ``$FLEET_HOME/pki`` (when those files exist).
    """
    ca, cert, key = cfg.mqtt_ca_file, cfg.mqtt_cert_file, cfg.mqtt_key_file
    if urlparse(cfg.mqtt_url).scheme in ("mqtts", "ssl"):
        pki = cfg.pki_dir
        defaults = (pki / "ca.crt", pki / "server-client.crt", pki / "server-client.key")
        if ca is None and defaults[0].exists():
            ca = defaults[0]
        if cert is None and key is None and defaults[1].exists() and defaults[2].exists():
            cert, key = defaults[1], defaults[2]
    return MqttSettings(
        url=cfg.mqtt_url,
        client_id=client_id,
        will=will,
        username=cfg.mqtt_username,
        password=cfg.mqtt_password,
        ca_file=str(ca) if ca else None,
        cert_file=str(cert) if cert else None,
        key_file=str(key) if key else None,
    )
