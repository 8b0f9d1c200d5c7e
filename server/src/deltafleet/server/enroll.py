"""Device identity on MQTT: the fleet CA, enrollment bundles, revocation, the broker's config.

Files under ``$FLEET_HOME``::

    pki/ca.crt, ca.key                the fleet CA (key mode 0600)
    pki/broker.crt, broker.key        Mosquitto's TLS server certificate
    pki/server-client.crt, .key       the server's own MQTT identity (CN = cfg.server_identity)
    pki/servers/<id>.crt, .key        further server replica identities (`--server-id`)
    pki/server-identities.json        every server identity the ACL grants the prefix to
    share-group                       the secret $share group name of the replicas (0600)
    pki/issued.json                   {device id: [certificate serials]}
    pki/crl.pem                       revoked serials (Mosquitto ``crlfile``)
    revoked.json                      server-side deny list of device ids (``is_revoked``)

Mosquitto takes the certificate CN as the username (``use_identity_as_username``) and the
username as the client id (``use_username_as_clientid``): whatever client id a client sends, the
broker names it by its certificate, so one certificate can take over no session but its own. The
ACL's ``%u`` patterns then confine each device to its own topics. Device ids cannot contain MQTT
wildcards (``check_device_id``), so ``%u`` never widens a pattern.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from deltafleet.shared import WireError, atomic_write_bytes, atomic_write_json, check_device_id

from . import keys
from .config import SHARE_GROUP_FILE, ServerConfig, check_share_group
from .errors import ConflictError, UsageError
from .pki import CertPair, create_ca, issue_cert, load_cert, make_crl

DEVICE_LEAVES_WRITE = ("hello", "status", "events", "chunkreq", "telemetry", "portrait", "bench")


# -- CA ---------------------------------------------------------------------------------------
def _pair(cfg: ServerConfig, name: str) -> CertPair | None:
    crt, key = cfg.pki_dir / f"{name}.crt", cfg.pki_dir / f"{name}.key"
    if crt.exists() and key.exists():
        return CertPair(crt.read_bytes(), key.read_bytes())
    return None


def _save_pair(path_stem: Path, pair: CertPair) -> None:
    atomic_write_bytes(path_stem.with_suffix(".key"), pair.key_pem, mode=0o600)
    atomic_write_bytes(path_stem.with_suffix(".crt"), pair.cert_pem, mode=0o644)


def ensure_ca(cfg: ServerConfig) -> CertPair:
    """The fleet CA, created on first use."""
    ca = _pair(cfg, "ca")
    if ca is None:
        cfg.pki_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ca = create_ca()
        _save_pair(cfg.pki_dir / "ca", ca)
        write_crl(cfg)
    return ca


def _issued(cfg: ServerConfig) -> dict[str, list[int]]:
    path = cfg.pki_dir / "issued.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _record_issued(cfg: ServerConfig, identity: str, pair: CertPair) -> None:
    issued = _issued(cfg)
    issued.setdefault(identity, []).append(pair.cert.serial_number)
    atomic_write_json(cfg.pki_dir / "issued.json", issued)


def server_identities(cfg: ServerConfig) -> list[str]:
    """Every server (replica) identity: ``cfg.server_identity`` first, then the ones recorded by
    `fleetctl broker config --server-id`. The ACL grants each of them the whole prefix."""
    return list(dict.fromkeys([cfg.server_identity, *_recorded_server_identities(cfg)]))


def _recorded_server_identities(cfg: ServerConfig) -> list[str]:
    path = cfg.pki_dir / "server-identities.json"
    return list(json.loads(path.read_text())) if path.exists() else []


def server_cert_paths(cfg: ServerConfig, identity: str) -> tuple[Path, Path]:
    """Where the certificate of server identity ``identity`` lives: ``pki/servers/<id>.*``, or
    the original ``pki/server-client.*`` pair when that one names ``identity``."""
    legacy = cfg.pki_dir / "server-client.crt"
    if legacy.exists() and certificate_cn(legacy) == identity:
        return legacy, legacy.with_suffix(".key")
    return cfg.pki_dir / "servers" / f"{identity}.crt", cfg.pki_dir / "servers" / f"{identity}.key"


def ensure_server_identity(cfg: ServerConfig, identity: str | None = None) -> tuple[Path, Path]:
    """The client certificate and key of a server identity (CN = ``identity``, default
    ``cfg.server_identity``), issued on first use. Each replica needs its own: the broker names
    a client by its certificate, so two replicas sharing one would take over each other's
    session in a loop."""
    identity = identity or cfg.server_identity
    try:
        check_device_id(identity)  # same charset: no MQTT wildcards, no spaces (ACL `user` line)
    except WireError as e:
        raise UsageError(f"server identity: {e}") from e
    known = server_identities(cfg)
    if identity not in known and identity in _issued(cfg):
        raise ConflictError(f"{identity!r} is an enrolled device; pick another server identity")
    ca = ensure_ca(cfg)
    legacy = cfg.pki_dir / "server-client"
    if identity == cfg.server_identity and _pair(cfg, "server-client") is None:
        pair = issue_cert(ca, identity)
        _save_pair(legacy, pair)
        _record_issued(cfg, identity, pair)
    crt, key = server_cert_paths(cfg, identity)
    if not (crt.exists() and key.exists()):
        crt.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pair = issue_cert(ca, identity)
        _save_pair(crt.with_suffix(""), pair)
        _record_issued(cfg, identity, pair)
    recorded = _recorded_server_identities(cfg)
    if identity not in recorded:
        atomic_write_json(cfg.pki_dir / "server-identities.json", [*recorded, identity])
    return crt, key


def ensure_share_group(cfg: ServerConfig) -> str:
    """The replicas' secret shared-subscription group, ``$FLEET_HOME/share-group`` (made on
    first use, mode 0600). Only a client that knows it can join the group: a device subscribing
    to ``$share/<guess>/...`` forms a group of its own and takes nothing from the server's."""
    path = cfg.home / SHARE_GROUP_FILE
    if not path.exists():
        atomic_write_bytes(path, (secrets.token_urlsafe(24) + "\n").encode(), mode=0o600)
    group = path.read_text().strip()
    check_share_group(group, str(path))
    return group


def ensure_broker_cert(cfg: ServerConfig, hosts: list[str]) -> tuple[Path, Path]:
    """Mosquitto's TLS certificate for ``hosts``; re-issued when the host list changes."""
    ca = ensure_ca(cfg)
    current = _pair(cfg, "broker")
    hosts_file = cfg.pki_dir / "broker-hosts.json"
    if current is None or not hosts_file.exists() or json.loads(hosts_file.read_text()) != hosts:
        _save_pair(cfg.pki_dir / "broker", issue_cert(ca, hosts[0], server_hosts=hosts))
        atomic_write_json(hosts_file, hosts)
    return cfg.pki_dir / "broker.crt", cfg.pki_dir / "broker.key"


# -- revocation -------------------------------------------------------------------------------
def _revoked(cfg: ServerConfig) -> dict[str, Any]:
    if not cfg.revoked_path.exists():
        return {}
    try:
        data = json.loads(cfg.revoked_path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the deny list {cfg.revoked_path}: {e}") from e
    revoked = data.get("revoked", {}) if isinstance(data, dict) else {}
    return revoked if isinstance(revoked, dict) else {}


def revoked_devices(cfg: ServerConfig) -> set[str]:
    return set(_revoked(cfg))


def is_revoked(cfg: ServerConfig, device_id: str) -> bool:
    """True if ``fleetctl device revoke`` named this device (server-side deny)."""
    return device_id in _revoked(cfg)


def write_crl(cfg: ServerConfig) -> Path:
    ca = _pair(cfg, "ca")
    if ca is None:
        raise UsageError("no fleet CA yet: run `fleetctl broker config` first")
    issued = _issued(cfg)
    serials = [s for dev in _revoked(cfg) for s in issued.get(dev, [])]
    path = cfg.pki_dir / "crl.pem"
    crl = make_crl(ca, serials)
    atomic_write_bytes(path, crl)
    for broker_dir in _broker_dirs(cfg):  # copies made by `fleetctl broker config`
        if broker_dir.is_dir():
            atomic_write_bytes(broker_dir / "crl.pem", crl)
    return path


def _broker_dirs(cfg: ServerConfig) -> list[Path]:
    path = cfg.pki_dir / "broker-dirs.json"
    return [Path(p) for p in json.loads(path.read_text())] if path.exists() else []


def revoke_device(cfg: ServerConfig, device_id: str, *, reason: str = "") -> list[int]:
    """Deny the device on the server and put every certificate issued to it on the CRL.

    The broker reads the CRL at start: reload or restart Mosquitto afterwards.
    """
    try:
        check_device_id(device_id)
    except WireError as e:
        raise UsageError(str(e)) from e
    revoked = _revoked(cfg)
    serials = _issued(cfg).get(device_id, [])
    revoked[device_id] = {"at": int(time.time()), "reason": reason, "serials": serials}
    atomic_write_json(cfg.revoked_path, {"v": 1, "revoked": revoked})
    if _pair(cfg, "ca") is not None:
        write_crl(cfg)
    return serials


# -- enrollment -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Enrollment:
    device_id: str
    directory: Path
    serial: int
    broker_url: str
    files: tuple[Path, ...]


def _agent_toml(device_id: str, broker_url: str, prefix: str, install_dir: str) -> str:
    return (
        "# deltafleet agent: enrollment snippet (merge into /etc/deltafleet/agent.toml)\n"
        f'device_id = "{device_id}"\n'
        f'broker_url = "{broker_url}"\n'
        f'topic_prefix = "{prefix}"\n'
        f'mqtt_ca_file = "{install_dir}/ca.crt"\n'
        f'mqtt_cert_file = "{install_dir}/client.crt"\n'
        f'mqtt_key_file = "{install_dir}/client.key"\n'
        "# Root of trust pinned at enrollment; rotations arrive on "
        f"{prefix}/trust/keys.\n"
        f'root_of_trust = "{install_dir}/root.json"\n'
        f'trust_bundle = "{install_dir}/trust.json"\n'
    )


def enroll_device(cfg: ServerConfig, device_id: str, out_dir: Path, *,
                  broker_url: str | None = None,
                  install_dir: str = "/etc/deltafleet") -> Enrollment:
    """Write an enrollment bundle: client cert + key (CN = device id), the CA certificate, the
    root of trust (root.json to pin, trust.json with the current key list), and agent.toml.

    The key is generated here and travels in the bundle: move the directory to the device
    over a trusted channel and delete it afterwards.
    """
    try:
        check_device_id(device_id)
    except WireError as e:
        raise UsageError(str(e)) from e
    if device_id in server_identities(cfg):
        raise UsageError(f"{device_id!r} is the server's MQTT identity; pick another device id")
    if is_revoked(cfg, device_id):
        raise ConflictError(f"device {device_id} is revoked; enroll it under a new id")
    if not keys.is_initialised(cfg):
        raise UsageError("no root of trust: run `fleetctl keys init` first")
    url = broker_url or cfg.mqtt_url
    if urlparse(url).scheme not in ("mqtts", "ssl"):
        raise UsageError(f"broker URL {url!r} is not mqtts://: devices authenticate with TLS")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConflictError(f"{out_dir} exists and is not empty")
    ca = ensure_ca(cfg)
    pair = issue_cert(ca, device_id)
    _record_issued(cfg, device_id, pair)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = {
        "client.crt": (pair.cert_pem, 0o644),
        "client.key": (pair.key_pem, 0o600),
        "ca.crt": (ca.cert_pem, 0o644),
        "root.json": (keys.pinned_root_bytes(cfg), 0o644),
        "trust.json": (keys.trust_bundle_bytes(cfg), 0o644),
        "agent.toml": (_agent_toml(device_id, url, cfg.topic_prefix, install_dir).encode(),
                       0o644),
    }
    for name, (data, mode) in files.items():
        atomic_write_bytes(out_dir / name, data, mode=mode)
    return Enrollment(device_id, out_dir, pair.cert.serial_number, url,
                      tuple(out_dir / n for n in files))


# -- broker config ----------------------------------------------------------------------------
def render_acl(prefix: str, server_identities: str | Sequence[str]) -> str:
    """Mosquitto ACL: each server identity (one per replica) may do anything under the prefix;
    a device (username = client id = CN = device id) may publish only its own device topics and
    read its desired state, artifact chunks, server presence and the trust bundle. Anonymous
    clients get no rule at all.

    Mosquitto 2.0's acl_file grants every SUBSCRIBE (``$share/...`` included) and checks read
    access per delivered message against the message's topic: a device's subscription to
    another device's topics or to ``$share/<group>/...`` delivers it nothing, and cannot take
    messages from the servers' group unless it knows the secret group name."""
    ids = [server_identities] if isinstance(server_identities, str) else list(server_identities)
    lines = ["# deltafleet ACL (generated by `fleetctl broker config`). No rule = no access."]
    for identity in ids:
        lines += [f"user {identity}", f"topic readwrite {prefix}/#"]
    lines += [
        "",
        "# every other authenticated client: %u is its certificate CN, i.e. its device id",
    ]
    lines += [f"pattern write {prefix}/dev/%u/{leaf}" for leaf in DEVICE_LEAVES_WRITE]
    lines += [
        f"pattern read {prefix}/dev/%u/desired/#",
        f"pattern read {prefix}/dev/%u/ack",
        f"pattern read {prefix}/dev/%u/benchreq",
        f"pattern read {prefix}/art/#",
        f"pattern read {prefix}/server/status",
        f"pattern read {prefix}/trust/#",
    ]
    return "\n".join(lines) + "\n"


def render_mosquitto_conf(*, port: int, bind: str | None, cafile: Path, certfile: Path,
                          keyfile: Path, crlfile: Path, aclfile: Path,
                          persistence_dir: Path | None = None) -> str:
    listener = f"listener {port} {bind}" if bind else f"listener {port}"
    lines = [
        "# deltafleet broker (generated by `fleetctl broker config`)",
        "per_listener_settings false",
        "allow_anonymous false",
        listener,
        f"cafile {cafile}",
        f"certfile {certfile}",
        f"keyfile {keyfile}",
        "tls_version tlsv1.2",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",  # client id = certificate CN, whatever the client sends
        f"crlfile {crlfile}",
        f"acl_file {aclfile}",
        "max_packet_size 8388608",  # retained manifests of multi-GB models (~4.4 MB at 4 GiB)
        # a device subscribing to an artifact gets every retained chunk at once: its queue must
        # hold them all (65,536 chunks of 64 KiB for 4 GiB; entries reference one stored copy)
        "max_queued_messages 70000",
    ]
    if persistence_dir is not None:
        # sessions (the servers' queued device messages) and retained messages survive a
        # restart; saved every second, so a crash loses at most about one second of changes
        lines += ["persistence true", f"persistence_location {persistence_dir}/",
                  "autosave_interval 1"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    conf: Path
    acl: Path
    ca: Path
    cert: Path
    key: Path
    crl: Path
    server_cert: Path
    server_key: Path


def write_broker_config(cfg: ServerConfig, out_dir: Path, *, port: int = 8883,
                        bind: str | None = None, hosts: list[str] | None = None,
                        persistence_dir: Path | None = None,
                        server_ids: Sequence[str] = ()) -> BrokerFiles:
    """mosquitto.conf + acl + TLS files in ``out_dir``; makes the CA, the broker certificate and
    the server identities (``cfg.server_identity`` plus ``server_ids``, one per replica) if
    missing, and refreshes the CRL. With more than one server identity the replicas' secret
    share group (``$FLEET_HOME/share-group``) is made too. Broker persistence goes to
    ``persistence_dir`` (default ``out_dir/persistence``)."""
    hosts = hosts or [urlparse(cfg.mqtt_url).hostname or "127.0.0.1"]
    ca = ensure_ca(cfg)
    broker_crt, broker_key = ensure_broker_cert(cfg, hosts)
    server_crt, server_key = ensure_server_identity(cfg)
    for identity in server_ids:
        ensure_server_identity(cfg, identity)
    if len(server_identities(cfg)) > 1:
        ensure_share_group(cfg)
    crl = write_crl(cfg)
    out_dir = out_dir.absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    persistence_dir = (persistence_dir or out_dir / "persistence").absolute()
    persistence_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    dirs = _broker_dirs(cfg)
    if out_dir not in dirs:
        atomic_write_json(cfg.pki_dir / "broker-dirs.json", [str(d) for d in [*dirs, out_dir]])
    files = BrokerFiles(
        conf=out_dir / "mosquitto.conf", acl=out_dir / "acl", ca=out_dir / "ca.crt",
        cert=out_dir / "broker.crt", key=out_dir / "broker.key", crl=out_dir / "crl.pem",
        server_cert=server_crt, server_key=server_key,
    )
    atomic_write_bytes(files.ca, ca.cert_pem)
    atomic_write_bytes(files.cert, broker_crt.read_bytes())
    atomic_write_bytes(files.key, broker_key.read_bytes(), mode=0o600)
    atomic_write_bytes(files.crl, crl.read_bytes())
    atomic_write_bytes(files.acl, render_acl(cfg.topic_prefix, server_identities(cfg)).encode())
    atomic_write_bytes(files.conf, render_mosquitto_conf(
        port=port, bind=bind, cafile=files.ca, certfile=files.cert, keyfile=files.key,
        crlfile=files.crl, aclfile=files.acl, persistence_dir=persistence_dir).encode())
    return files


def certificate_cn(path: Path) -> str:
    from .pki import common_name

    return common_name(load_cert(path.read_bytes()))


__all__ = [
    "BrokerFiles",
    "Enrollment",
    "enroll_device",
    "ensure_ca",
    "ensure_server_identity",
    "ensure_share_group",
    "is_revoked",
    "render_acl",
    "render_mosquitto_conf",
    "revoke_device",
    "revoked_devices",
    "server_cert_paths",
    "server_identities",
    "write_broker_config",
    "write_crl",
]
