"""Server configuration: one frozen object built from the environment, passed to constructors."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from .errors import UsageError

if TYPE_CHECKING:  # paho-mqtt costs every fleetctl start ~25 ms; only `server` needs it
    from deltafleet.shared.mqtt import MqttSettings, Will

DEFAULT_HOME = "~/.local/share/deltafleet"
DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"
DEFAULT_TOPIC_PREFIX = "deltafleet/v1"
DEFAULT_SERVER_IDENTITY = "fleet-server"  # CN of the server's MQTT client certificate
SHARE_GROUP_FILE = "share-group"  # under $FLEET_HOME: the replicas' secret $share group
MIN_SHARE_GROUP_CHARS = 16  # a share group is a secret: a guessable one lets devices join it
_SHARE_GROUP = re.compile(r"[A-Za-z0-9_-]+")


def check_share_group(group: str, source: str = "FLEET_SHARE_GROUP") -> str:
    """A share group name must be a secret: whoever knows it can join the servers' shared
    subscription and take (and, being refused read access, drop) a share of device messages."""
    if not _SHARE_GROUP.fullmatch(group):
        raise UsageError(f"{source}: the share group may hold only letters, digits, '_' or '-'")
    if len(group) < MIN_SHARE_GROUP_CHARS:
        raise UsageError(f"{source}: a share group of {len(group)} characters is guessable; use "
                         f"a random secret of {MIN_SHARE_GROUP_CHARS}+ characters (`fleetctl "
                         "broker config --server-id ...` writes one to $FLEET_HOME/share-group)")
    return group


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
    # Rounds of chunk publishes of one artifact start at least this far apart
    # (FLEET_CHUNK_ROUND_S): the longest a device asking late waits for its chunks, and with
    # the rollout's duration the bound on publishes per chunk (delivery.chunks).
    chunk_round_s: float = 5.0
    # Publish every chunk retained (FLEET_CHUNK_RETAIN, "0" = off): the broker then hands a
    # device asking late every chunk on its subscription, and the server publishes each chunk
    # of a rollout once (delivery.chunks). The retained chunks of an artifact no longer served
    # are cleared FLEET_CHUNK_RETAIN_LINGER_S later (a later wave of its rollout reuses them).
    chunk_retain: bool = True
    chunk_retain_linger_s: float = 900.0
    # Seconds between sweeps for automatic benchmarks (FLEET_AUTO_BENCH_S, 0 = off): a device
    # type with an online device is asked to benchmark the newest versions' variants none of
    # its devices measured or was asked for (bench_requests.auto_requests, docs/portraits.md).
    auto_bench_s: float = 60.0
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
    # This replica's stable MQTT client id (FLEET_SERVER_ID): turns on a persistent session.
    # With the generated broker config the broker names the server by its certificate, so this
    # must equal the certificate's CN (the server refuses to start otherwise).
    server_id: str | None = None
    # Secret $share group of the replicas (FLEET_SHARE_GROUP, else $FLEET_HOME/share-group);
    # None = a plain subscription (one replica).
    share_group: str | None = None
    keylist_ttl_s: int = 365 * 86400  # how long a root-signed key list stays valid
    # Management API and web console (FLEET_API_LISTEN, HOST:PORT or PORT = 127.0.0.1:PORT);
    # None = off. TLS on the listener when FLEET_API_TLS_CERT and FLEET_API_TLS_KEY are set.
    api_listen: str | None = None
    api_tls_cert_file: Path | None = None
    api_tls_key_file: Path | None = None
    # Serve Prometheus /metrics on HOST:PORT (FLEET_METRICS_LISTEN or `fleetctl server
    # --metrics-listen`); None = off. Use a loopback address unless a firewall guards it.
    metrics_listen: str | None = None

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
        FLEET_MQTT_IDENTITY, FLEET_SERVER_ID, FLEET_SHARE_GROUP, FLEET_CHUNK_ROUND_S, FLEET_CHUNK_RETAIN,
        FLEET_CHUNK_RETAIN_LINGER_S, FLEET_AUTO_BENCH_S (0 = off), FLEET_API_LISTEN,
        FLEET_API_TLS_CERT, FLEET_API_TLS_KEY and FLEET_METRICS_LISTEN (empty = unset).

        The server identity is FLEET_MQTT_IDENTITY, else FLEET_SERVER_ID, else ``fleet-server``;
        the share group is FLEET_SHARE_GROUP, else the content of ``$FLEET_HOME/share-group``.
        A share group that is not a secret raises UsageError."""
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
            server_identity=(env.get("FLEET_MQTT_IDENTITY") or env.get("FLEET_SERVER_ID")
                             or DEFAULT_SERVER_IDENTITY),
            server_id=env.get("FLEET_SERVER_ID") or None,
            share_group=_share_group(env, home),
            chunk_round_s=_seconds(env, "FLEET_CHUNK_ROUND_S", 5.0),
            chunk_retain=_flag(env, "FLEET_CHUNK_RETAIN", True),
            chunk_retain_linger_s=_seconds(env, "FLEET_CHUNK_RETAIN_LINGER_S", 900.0),
            auto_bench_s=_seconds(env, "FLEET_AUTO_BENCH_S", 60.0, zero_is_off=True),
            api_listen=env.get("FLEET_API_LISTEN") or None,
            api_tls_cert_file=path("FLEET_API_TLS_CERT"),
            api_tls_key_file=path("FLEET_API_TLS_KEY"),
            metrics_listen=(check_listen(env["FLEET_METRICS_LISTEN"], "FLEET_METRICS_LISTEN")
                            if env.get("FLEET_METRICS_LISTEN") else None),
        )


def parse_listen(text: str, source: str = "metrics listen address") -> tuple[str, int]:
    """``HOST:PORT`` (``:PORT`` = every interface, ``[::1]:PORT`` for IPv6) or UsageError."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"{source} {text!r}: use HOST:PORT, e.g. 127.0.0.1:9464")
    return host or "0.0.0.0", int(port)


def check_listen(text: str, source: str) -> str:
    parse_listen(text, source)
    return text.strip()


def _flag(env: Mapping[str, str], var: str, default: bool) -> bool:
    raw = (env.get(var) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{var}: expected 1/0, true/false, yes/no or on/off, got {env[var]!r}")


def _seconds(env: Mapping[str, str], var: str, default: float, *,
             zero_is_off: bool = False) -> float:
    raw = env.get(var)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if zero_is_off and value == 0:
        return 0.0
    if not 0 < value < 3600:
        off = " (0 = off)" if zero_is_off else ""
        raise UsageError(f"{var}: expected seconds between 0 and 3600{off}, got {raw!r}")
    return value


def _share_group(env: Mapping[str, str], home: Path) -> str | None:
    if env.get("FLEET_SHARE_GROUP"):
        return check_share_group(env["FLEET_SHARE_GROUP"])
    path = home / SHARE_GROUP_FILE
    try:
        group = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UsageError(f"cannot read the share group {path}: {e}") from e
    return check_share_group(group, str(path))


def mqtt_settings(cfg: ServerConfig, client_id: str, will: Will | None) -> MqttSettings:
    """The server's MqttSettings: URL, last will and its credentials.

    With an mqtts:// URL, TLS files not set in the environment default to the server identity
    made by `fleetctl broker config` under ``$FLEET_HOME/pki`` (when those files exist):
    ``pki/servers/<server_identity>.*``, else ``pki/server-client.*``.
    """
    ca, cert, key = cfg.mqtt_ca_file, cfg.mqtt_cert_file, cfg.mqtt_key_file
    if urlparse(cfg.mqtt_url).scheme in ("mqtts", "ssl"):
        pki = cfg.pki_dir
        mine = (pki / "servers" / f"{cfg.server_identity}.crt",
                pki / "servers" / f"{cfg.server_identity}.key")
        if not (mine[0].exists() and mine[1].exists()):
            mine = (pki / "server-client.crt", pki / "server-client.key")
        defaults = (pki / "ca.crt", *mine)
        if ca is None and defaults[0].exists():
            ca = defaults[0]
        if cert is None and key is None and defaults[1].exists() and defaults[2].exists():
            cert, key = defaults[1], defaults[2]
    from deltafleet.shared.mqtt import MqttSettings

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


def check_client_identity(settings: MqttSettings) -> None:
    """Refuse a persistent client id that differs from the CN of the client certificate.

    A broker configured by `fleetctl broker config` names every client by its certificate
    (``use_username_as_clientid``): the session would silently be the CN's, shared with every
    replica holding that certificate, and the replicas would take it over from each other.
    """
    if not settings.cert_file:
        return
    from .pki import PkiError, common_name, load_cert

    try:
        cn = common_name(load_cert(Path(settings.cert_file).read_bytes()))
    except (OSError, PkiError) as e:
        raise UsageError(f"cannot read the MQTT client certificate {settings.cert_file}: {e}") \
            from e
    if cn != settings.client_id:
        raise UsageError(
            f"FLEET_SERVER_ID {settings.client_id!r} differs from the identity {cn!r} of the "
            f"certificate {settings.cert_file}: the broker names a client by its certificate. "
            f"Give each replica its own identity: `fleetctl broker config --server-id "
            f"{settings.client_id}` (then restart the broker), or set FLEET_SERVER_ID={cn}")
