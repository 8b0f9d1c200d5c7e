"""The server's side of the root of trust: root chain, key list, online signing key.

Files under ``$FLEET_HOME/keys`` (private keys mode 0600)::

    signing.key / signing.pub   the online key that signs manifests (``online_signing_key``)
    root.key                    the root key, ONLY if the operator keeps it online
    roots/NNNN.json             every root version, signed (the chain devices walk)
    keylist.json                the current key list, signed by the root
    pending/signing.key         an online key waiting for its root-signed key list
    pending/request.json        what the root must sign (``fleetctl keys export`` / ``sign``)

Offline root flow: ``keys rotate`` writes a signing request; on the offline machine
``keys sign REQUEST --root-key K --out SIGNED``; back on the server ``keys import SIGNED``
verifies it exactly as a device would (``TrustStore``) and only then activates it.

Request  ``{"v":1, "type":"signing-request", "root": root payload | null, "keylist": payload}``
Signed   ``{"v":1, "type":"signed-trust", "root": envelope | null, "keylist": envelope}``
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltafleet.shared import (
    DeltafleetError,
    KeyFileError,
    KeyList,
    RootMetadata,
    SigningKey,
    TrustStore,
    WireError,
    atomic_write_bytes,
    canonical_json,
    load_public_key,
    parse_json_object,
    sign_payload,
    trust_topic,
)
from deltafleet.shared.signing import key_id

from .config import ServerConfig
from .errors import UsageError

log = logging.getLogger(__name__)

REQUEST_TYPE = "signing-request"
SIGNED_TYPE = "signed-trust"


class KeysError(UsageError):
    """The key material is missing, inconsistent, or a signed import does not verify."""


@dataclass(frozen=True, slots=True)
class KeyPaths:
    dir: Path

    @property
    def root_key(self) -> Path:
        return self.dir / "root.key"

    @property
    def roots(self) -> Path:
        return self.dir / "roots"

    @property
    def keylist(self) -> Path:
        return self.dir / "keylist.json"

    @property
    def signing_key(self) -> Path:
        return self.dir / "signing.key"

    @property
    def signing_pub(self) -> Path:
        return self.dir / "signing.pub"

    @property
    def pending(self) -> Path:
        return self.dir / "pending"

    @property
    def pending_key(self) -> Path:
        return self.pending / "signing.key"

    @property
    def request(self) -> Path:
        return self.pending / "request.json"


def paths(cfg: ServerConfig) -> KeyPaths:
    return KeyPaths(cfg.keys_dir)


def _now(now: int | None) -> int:
    return int(time.time()) if now is None else now


def _write_json(path: Path, value: Any, mode: int = 0o644) -> None:
    atomic_write_bytes(path, canonical_json(value) + b"\n", mode=mode)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return parse_json_object(path.read_bytes(), max_bytes=4 << 20)
    except OSError as e:
        raise KeysError(f"cannot read {path}: {e}") from e


def _save_private(key: SigningKey, path: Path) -> None:
    key.save(path, path.with_suffix(".pub"))


# -- state ------------------------------------------------------------------------------------
def is_initialised(cfg: ServerConfig) -> bool:
    p = paths(cfg)
    return p.keylist.exists() and p.roots.is_dir() and any(p.roots.glob("*.json"))


def root_chain(cfg: ServerConfig) -> list[dict[str, Any]]:
    files = sorted(paths(cfg).roots.glob("*.json"))
    if not files:
        raise KeysError("no root of trust: run `fleetctl keys init` first")
    return [_read_json(f) for f in files]


def load_trust(cfg: ServerConfig) -> TrustStore:
    """The server's own view, verified exactly as a device verifies it (expiry not checked)."""
    chain = root_chain(cfg)
    try:
        store = TrustStore.pin(chain[0])
        for env in chain[1:]:
            store.update_root(env)
        store.update_keylist(_read_json(paths(cfg).keylist), now=0)
    except DeltafleetError as e:
        raise KeysError(f"the key material in {cfg.keys_dir} does not verify: {e}") from e
    return store


def _root_key(cfg: ServerConfig, explicit: Path | None) -> SigningKey | None:
    path = explicit or paths(cfg).root_key
    if not path.exists():
        if explicit is not None:
            raise KeysError(f"root key {explicit} does not exist")
        return None
    return SigningKey.load(path)


def _keylist_payload(version: int, keys: list[SigningKey], now: int, ttl_s: int
                     ) -> dict[str, Any]:
    return KeyList(version, now, now + ttl_s, {k.keyid: k.public_key for k in keys}).to_wire()


# -- init -------------------------------------------------------------------------------------
def init_keys(cfg: ServerConfig, *, root_key_out: Path | None = None, now: int | None = None
              ) -> TrustStore:
    """Make root v1 and key list v1 naming the online key (``signing.key``, made if missing).

    With ``root_key_out`` the root private key is written there (for offline storage) and not
    kept in FLEET_HOME.
    """
    now = _now(now)
    p = paths(cfg)
    if is_initialised(cfg):
        raise KeysError(f"keys already initialised in {p.dir}; see `fleetctl keys show`")
    p.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    online = SigningKey.load(p.signing_key) if p.signing_key.exists() else None
    if online is None:
        online = SigningKey.generate()
        online.save(p.signing_key, p.signing_pub)
    root = SigningKey.generate()
    root_env = sign_payload(RootMetadata(1, {root.keyid: root.public_key}).to_wire(), [root])
    keylist_env = sign_payload(_keylist_payload(1, [online], now, cfg.keylist_ttl_s), [root])
    _save_private(root, root_key_out if root_key_out is not None else p.root_key)
    _write_json(p.roots / "0001.json", root_env)
    _write_json(p.keylist, keylist_env)
    return load_trust(cfg)


# -- rotation ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RotationResult:
    activated: bool  # False: a request waits in pending/request.json for the offline root
    request_path: Path | None
    keylist_version: int
    online_keyid: str


def rotate_online_key(cfg: ServerConfig, *, root_key: Path | None = None,
                      now: int | None = None) -> RotationResult:
    """New online key; the next key list names only it, so the old key is refused by devices
    as soon as they hold the new list. Activated at once if the root key is at hand."""
    now = _now(now)
    store = load_trust(cfg)
    p = paths(cfg)
    new = SigningKey.generate()
    p.pending.mkdir(parents=True, exist_ok=True, mode=0o700)
    new.save(p.pending_key, p.pending_key.with_suffix(".pub"))
    assert store.keylist is not None
    request = {"v": 1, "type": REQUEST_TYPE, "root": None,
               "keylist": _keylist_payload(store.keylist.version + 1, [new], now,
                                           cfg.keylist_ttl_s)}
    return _sign_now_or_later(cfg, request, [_root_key(cfg, root_key)], now, new.keyid)


def rotate_root(cfg: ServerConfig, new_root_pub: Path, *, root_key: Path | None = None,
                new_root_key: Path | None = None, now: int | None = None) -> RotationResult:
    """Root version + 1 naming the new root key; signed by the old AND the new root. The key
    list is re-issued (version + 1, same online keys) under the new root."""
    now = _now(now)
    store = load_trust(cfg)
    assert store.keylist is not None
    new_pub = load_public_key(new_root_pub)
    root_payload = RootMetadata(store.root.version + 1, {key_id(new_pub): new_pub}).to_wire()
    keylist_payload = KeyList(store.keylist.version + 1, now, now + cfg.keylist_ttl_s,
                              dict(store.keylist.keys), store.keylist.threshold).to_wire()
    request = {"v": 1, "type": REQUEST_TYPE, "root": root_payload, "keylist": keylist_payload}
    signers = [_root_key(cfg, root_key)]
    signers.append(SigningKey.load(new_root_key) if new_root_key is not None else None)
    current = online_signing_key(cfg, check_expiry=False)
    return _sign_now_or_later(cfg, request, signers, now, current.keyid)


def _sign_now_or_later(cfg: ServerConfig, request: dict[str, Any],
                       signers: list[SigningKey | None], now: int, keyid: str
                       ) -> RotationResult:
    p = paths(cfg)
    version = request["keylist"]["version"]
    if all(k is not None for k in signers):
        signed = sign_request(request, [k for k in signers if k is not None])
        import_signed(cfg, signed, now=now)
        with contextlib.suppress(FileNotFoundError):
            p.request.unlink()
        return RotationResult(True, None, version, keyid)
    _write_json(p.request, request)
    return RotationResult(False, p.request, version, keyid)


def sign_request(request: dict[str, Any], keys: list[SigningKey]) -> dict[str, Any]:
    """Offline side: sign a signing request. The root payload is signed by every key given
    (old and new root); the key list by the new root's keys, or by every key without one."""
    if request.get("v") != 1 or request.get("type") != REQUEST_TYPE:
        raise KeysError("not a deltafleet signing request")
    root_payload, keylist_payload = request.get("root"), request.get("keylist")
    if not isinstance(keylist_payload, dict) or not (root_payload is None
                                                     or isinstance(root_payload, dict)):
        raise KeysError("signing request needs a keylist payload")
    if not keys:
        raise KeysError("no signing key given")
    root_env = None
    keylist_signers = keys
    if root_payload is not None:
        try:
            new_root = RootMetadata.from_wire(root_payload)
        except WireError as e:
            raise KeysError(f"invalid root in the request: {e}") from e
        root_env = sign_payload(root_payload, keys)
        keylist_signers = [k for k in keys if k.keyid in new_root.keys]
        if not keylist_signers:
            raise KeysError("none of the given keys is the new root key")
    return {"v": 1, "type": SIGNED_TYPE, "root": root_env,
            "keylist": sign_payload(keylist_payload, keylist_signers)}


def import_signed(cfg: ServerConfig, signed: dict[str, Any], *, now: int | None = None
                  ) -> TrustStore:
    """Verify a signed root / key list as a device would, then make it the server's."""
    now = _now(now)
    if signed.get("v") != 1 or signed.get("type") != SIGNED_TYPE:
        raise KeysError("not a deltafleet signed-trust file (made by `fleetctl keys sign`)")
    store = load_trust(cfg)
    p = paths(cfg)
    try:
        if signed.get("root") is not None:
            store.update_root(signed["root"])
        new = store.update_keylist(signed.get("keylist"), now)  # type: ignore[arg-type]
    except DeltafleetError as e:
        raise KeysError(f"signed file refused: {e}") from e
    if signed.get("root") is not None:
        _write_json(p.roots / f"{store.root.version:04d}.json", signed["root"])
    _write_json(p.keylist, signed["keylist"])
    _activate_pending(cfg, new)
    with contextlib.suppress(OSError, DeltafleetError):
        pending = _read_json(p.request).get("keylist") or {}
        if isinstance(pending, dict) and pending.get("version", 0) <= new.version:
            p.request.unlink()  # the request this import answered
    return store


def _activate_pending(cfg: ServerConfig, keylist: KeyList) -> None:
    """Make the pending online key current once a key list names it (idempotent: also
    finishes an activation that a crash interrupted)."""
    p = paths(cfg)
    if not p.pending_key.exists():
        return
    pending = SigningKey.load(p.pending_key)
    if pending.keyid not in keylist.keys:
        return
    pending.save(p.signing_key, p.signing_pub)  # atomic replace; the old private key is gone
    for f in (p.pending_key, p.pending_key.with_suffix(".pub"), p.request):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()


# -- what the daemon and enrollment use --------------------------------------------------------
def online_signing_key(cfg: ServerConfig, *, now: int | None = None,
                       check_expiry: bool = True) -> SigningKey:
    """The key the controller must sign manifests with.

    Without ``keys init`` (legacy single-key setup) this is ``signing.key`` as before. With a
    root of trust, the key must be named by the current key list and the list must not have
    expired: signing with a key devices will refuse is a configuration error, said early.
    """
    p = paths(cfg)
    if not is_initialised(cfg):
        return SigningKey.load(cfg.signing_key_path)
    store = load_trust(cfg)
    assert store.keylist is not None
    _activate_pending(cfg, store.keylist)
    key = SigningKey.load(p.signing_key)
    if key.keyid not in store.keylist.keys:
        raise KeyFileError(
            f"signing key {key.keyid[:16]} is not in key list v{store.keylist.version}: "
            "finish the rotation with `fleetctl keys import`")
    if check_expiry and store.keylist.expires_at <= _now(now):
        raise KeyFileError(
            f"key list v{store.keylist.version} expired; re-sign it with the root key "
            "(`fleetctl keys rotate` then `keys sign` / `keys import`)")
    return key


def trust_bundle_bytes(cfg: ServerConfig) -> bytes:
    return load_trust(cfg).bundle().to_bytes()


def pinned_root_bytes(cfg: ServerConfig) -> bytes:
    """The newest root envelope: what a newly enrolled device pins."""
    return canonical_json(root_chain(cfg)[-1])


def trust_publications(cfg: ServerConfig) -> list[tuple[str, bytes]]:
    """Retained (topic, payload) pairs the daemon publishes on every connect and after a key
    rotation: ``{prefix}/trust/keys`` carrying the root chain and the current key list. Empty
    without ``keys init``."""
    if not is_initialised(cfg):
        return []
    return [(trust_topic(cfg.topic_prefix), trust_bundle_bytes(cfg))]


def describe(cfg: ServerConfig, *, now: int | None = None) -> dict[str, Any]:
    now = _now(now)
    p = paths(cfg)
    store = load_trust(cfg)
    assert store.keylist is not None
    online = SigningKey.load(p.signing_key) if p.signing_key.exists() else None
    return {
        "root_version": store.root.version,
        "root_keyids": sorted(store.root.keys),
        "root_threshold": store.root.threshold,
        "root_key_online": p.root_key.exists(),
        "keylist_version": store.keylist.version,
        "keylist_issued_at": store.keylist.issued_at,
        "keylist_expires_at": store.keylist.expires_at,
        "keylist_expired": store.keylist.expires_at <= now,
        "keylist_keyids": sorted(store.keylist.keys),
        "online_keyid": online.keyid if online else None,
        "pending_request": str(p.request) if p.request.exists() else None,
    }


def trust_files(cfg: ServerConfig) -> dict[str, bytes]:
    """Public trust material by file name: root.json (pin), trust.json (bundle), and the
    pending request.json if any. No private keys (``keys export``, ``GET /keys/trust``)."""
    files = {"root.json": pinned_root_bytes(cfg), "trust.json": load_trust(cfg).bundle().to_bytes()}
    p = paths(cfg)
    if p.request.exists():
        files["request.json"] = p.request.read_bytes()
    return files


def export_trust(cfg: ServerConfig, out_dir: Path) -> list[Path]:
    """Write ``trust_files`` into ``out_dir``."""
    return write_trust_files(trust_files(cfg), out_dir)


def write_trust_files(files: dict[str, bytes], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in files.items():
        atomic_write_bytes(out_dir / name, data)
        written.append(out_dir / name)
    return written


def rotation_to_json(result: RotationResult) -> dict[str, Any]:
    return {"activated": result.activated, "keylist_version": result.keylist_version,
            "online_keyid": result.online_keyid,
            "request_path": str(result.request_path) if result.request_path else None}


def read_signed_file(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise KeysError(f"cannot read {path}: {e}") from e


def generate_root_key(out: Path) -> SigningKey:
    """Offline side: a new root key pair (``out`` and ``out.pub``) for ``keys rotate --root``."""
    if out.exists():
        raise KeysError(f"{out} exists; refusing to overwrite a key")
    key = SigningKey.generate()
    _save_private(key, out)
    return key


__all__ = [
    "KeysError",
    "RotationResult",
    "describe",
    "export_trust",
    "generate_root_key",
    "import_signed",
    "init_keys",
    "is_initialised",
    "load_trust",
    "online_signing_key",
    "pinned_root_bytes",
    "rotate_online_key",
    "rotate_root",
    "rotation_to_json",
    "sign_request",
    "trust_bundle_bytes",
    "trust_files",
    "trust_publications",
    "write_trust_files",
]
