"""TUF-style root of trust: an offline root key vouches for the online keys that sign manifests.

Two kinds of signed metadata, both in the envelope of ``signing.py`` (``{"v", "payload",
"signatures"}``, Ed25519 over the canonical JSON of ``payload``):

``root`` (payload ``{"v":1, "type":"root", "version", "keys": {keyid: b64 raw public key},
"threshold"}``)
    Who may sign key lists. Version 1 is signed by its own keys and pinned on a device at
    enrollment. Version N+1 must be signed by ``threshold`` of the keys of version N AND by
    ``threshold`` of its own keys, so neither a stolen old root alone nor a forged new one can
    take over. Versions go up by exactly one: a device walks the chain.

``keylist`` (payload ``{"v":1, "type":"keylist", "version", "issued_at", "expires_at",
"keys": {keyid: b64 raw public key}, "threshold"}``)
    The online keys that may sign manifests. Signed by ``threshold`` of the current root keys;
    the version must strictly increase (no rollback to a list that still names a retired key),
    and an expired list is refused (no indefinite freeze).

A ``trust`` bundle (``{"v":1, "type":"trust", "roots": [root envelopes, oldest first],
"keylist": envelope}``) carries the whole chain in one retained MQTT message, so a device never
depends on the order in which the broker delivers several retained topics.

``TrustStore`` holds every rule and does no I/O (after python-tuf's ``TrustedMetadataSet``): the
agent persists ``to_state()`` durably after every accepted update and restores with
``from_state()``. Every parser raises only ``WireError`` (malformed) or ``VerificationError``
(well-formed but not trustworthy).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .canonical import canonical_json, parse_json_object
from .errors import VerificationError, WireError
from .signing import ENVELOPE_VERSION, SigningKey, key_id

TRUST_VERSION = 1
MAX_TRUST_BYTES = 256 * 1024
MAX_KEYS = 64
MAX_ROOTS = 1024
MAX_SIGNATURES = 64
TRUST_TOPIC_LEAF = "trust/keys"


def trust_topic(prefix: str) -> str:
    """The retained topic that carries the trust bundle: ``{prefix}/trust/keys``."""
    return f"{prefix}/{TRUST_TOPIC_LEAF}"


# -- keys --------------------------------------------------------------------------------------
def encode_public_key(key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def decode_public_key(text: Any) -> Ed25519PublicKey:
    if not isinstance(text, str) or len(text) > 64:
        raise WireError("public key must be base64 of 32 raw Ed25519 bytes")
    try:
        raw = base64.b64decode(text, validate=True)
        if len(raw) != 32:
            raise WireError("invalid Ed25519 public key: wrong length")
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as e:
        raise WireError(f"invalid Ed25519 public key: {e}") from e


def _int(d: dict[str, Any], key: str, *, minimum: int = 0) -> int:
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise WireError(f"field {key!r} must be an integer >= {minimum}")
    if value >= 1 << 63:
        raise WireError(f"field {key!r} is out of range")
    return value


def _keys(d: dict[str, Any]) -> dict[str, Ed25519PublicKey]:
    raw = d.get("keys")
    if not isinstance(raw, dict) or not raw or len(raw) > MAX_KEYS:
        raise WireError(f"field 'keys' must map 1-{MAX_KEYS} keyids to public keys")
    keys: dict[str, Ed25519PublicKey] = {}
    for kid, text in raw.items():
        key = decode_public_key(text)
        if kid != key_id(key):
            raise WireError(f"keyid {str(kid)[:16]} does not match its public key")
        keys[kid] = key
    return keys


def _check_header(d: dict[str, Any], kind: str, allowed: set[str]) -> None:
    if d.get("v") != TRUST_VERSION:
        raise WireError(f"unsupported {kind} version {d.get('v')!r}")
    if d.get("type") != kind:
        raise WireError(f"payload is not a {kind}")
    unknown = set(d) - allowed
    if unknown:
        raise WireError(f"unknown {kind} fields: {', '.join(sorted(map(str, unknown)))[:200]}")


def _threshold(d: dict[str, Any], n_keys: int) -> int:
    t = d.get("threshold", 1)
    if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= n_keys:
        raise WireError(f"threshold must be between 1 and the number of keys ({n_keys})")
    return t


@dataclass(frozen=True, slots=True)
class RootMetadata:
    """The keys allowed to sign key lists (and the next root)."""

    version: int
    keys: dict[str, Ed25519PublicKey]
    threshold: int = 1

    _FIELDS = frozenset({"v", "type", "version", "keys", "threshold"})

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": TRUST_VERSION, "type": "root", "version": self.version,
            "keys": {k: encode_public_key(p) for k, p in sorted(self.keys.items())},
            "threshold": self.threshold,
        }

    @classmethod
    def from_wire(cls, d: Any) -> RootMetadata:
        if not isinstance(d, dict):
            raise WireError("root must be an object")
        _check_header(d, "root", set(cls._FIELDS))
        keys = _keys(d)
        return cls(_int(d, "version", minimum=1), keys, _threshold(d, len(keys)))


@dataclass(frozen=True, slots=True)
class KeyList:
    """The online keys allowed to sign manifests until ``expires_at`` (unix seconds)."""

    version: int
    issued_at: int
    expires_at: int
    keys: dict[str, Ed25519PublicKey]
    threshold: int = 1

    _FIELDS = frozenset({"v", "type", "version", "issued_at", "expires_at", "keys", "threshold"})

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": TRUST_VERSION, "type": "keylist", "version": self.version,
            "issued_at": self.issued_at, "expires_at": self.expires_at,
            "keys": {k: encode_public_key(p) for k, p in sorted(self.keys.items())},
            "threshold": self.threshold,
        }

    @classmethod
    def from_wire(cls, d: Any) -> KeyList:
        if not isinstance(d, dict):
            raise WireError("keylist must be an object")
        _check_header(d, "keylist", set(cls._FIELDS))
        keys = _keys(d)
        issued, expires = _int(d, "issued_at"), _int(d, "expires_at")
        if expires <= issued:
            raise WireError("keylist expires before it was issued")
        return cls(_int(d, "version", minimum=1), issued, expires, keys,
                   _threshold(d, len(keys)))

    def public_keys(self) -> list[Ed25519PublicKey]:
        return list(self.keys.values())


# -- envelopes with several signatures ---------------------------------------------------------
def sign_payload(payload: dict[str, Any], keys: Iterable[SigningKey]) -> dict[str, Any]:
    """One envelope over ``payload`` with a signature by each of ``keys``."""
    message = canonical_json(payload)
    sigs = [{"keyid": k.keyid, "sig": base64.b64encode(k.private_key.sign(message)).decode()}
            for k in keys]
    if not sigs:
        # a caller's bug, not bad input: stays builtin (test_error_root)
        raise ValueError("sign_payload needs at least one key")
    return {"v": ENVELOPE_VERSION, "payload": payload, "signatures": sigs}


def _split_envelope(env: Any) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    if not isinstance(env, dict) or env.get("v") != ENVELOPE_VERSION:
        raise WireError("not a version-1 signed envelope")
    if set(env) - {"v", "payload", "signatures"}:
        raise WireError("unknown envelope fields")
    payload, sigs = env.get("payload"), env.get("signatures")
    if not isinstance(payload, dict) or not isinstance(sigs, list) or not sigs:
        raise WireError("envelope needs an object payload and a non-empty signatures list")
    if len(sigs) > MAX_SIGNATURES:
        raise WireError(f"more than {MAX_SIGNATURES} signatures")
    out: list[tuple[str, bytes]] = []
    for entry in sigs:
        if not isinstance(entry, dict):
            raise WireError("signature entry is not an object")
        kid, sig = entry.get("keyid"), entry.get("sig")
        if not isinstance(kid, str) or not isinstance(sig, str) or len(sig) > 200:
            raise WireError("signature entry needs string keyid and sig")
        try:
            out.append((kid, base64.b64decode(sig, validate=True)))
        except (binascii.Error, ValueError) as e:
            raise WireError("signature is not base64") from e
    return payload, out


def _count_signers(env: Any, keys: dict[str, Ed25519PublicKey]) -> tuple[dict[str, Any], int]:
    """Payload of ``env`` and how many distinct ``keys`` made a valid signature over it."""
    payload, sigs = _split_envelope(env)
    message = canonical_json(payload)
    good: set[str] = set()
    for kid, sig in sigs:
        key = keys.get(kid)
        if key is None or kid in good:
            continue
        try:
            key.verify(sig, message)
        except InvalidSignature:
            continue
        good.add(kid)
    return payload, len(good)


def _require(env: Any, keys: dict[str, Ed25519PublicKey], threshold: int, what: str
             ) -> dict[str, Any]:
    payload, n = _count_signers(env, keys)
    if n < threshold:
        raise VerificationError(f"{what} has {n} valid signature(s); {threshold} required")
    return payload


def verify_self_signed_root(env: Any) -> RootMetadata:
    """Check a root signed by its own keys (what a device pins at enrollment)."""
    payload, _ = _split_envelope(env)
    root = RootMetadata.from_wire(payload)
    _require(env, root.keys, root.threshold, f"root v{root.version}")
    return root


def verify_with_threshold(data: bytes, keys: dict[str, Ed25519PublicKey], threshold: int,
                          *, max_bytes: int = 1 << 20) -> dict[str, Any]:
    """Payload of an envelope (bytes) once ``threshold`` of ``keys`` signed it."""
    env = parse_json_object(data, max_bytes=max_bytes)
    return _require(env, keys, threshold, "envelope")


# -- trust bundle ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TrustBundle:
    roots: tuple[dict[str, Any], ...]  # root envelopes, oldest first
    keylist: dict[str, Any]  # keylist envelope

    def to_wire(self) -> dict[str, Any]:
        return {"v": TRUST_VERSION, "type": "trust", "roots": list(self.roots),
                "keylist": self.keylist}

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_wire())

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = MAX_TRUST_BYTES) -> TrustBundle:
        d = parse_json_object(data, max_bytes=max_bytes)
        if d.get("v") != TRUST_VERSION or d.get("type") != "trust":
            raise WireError("not a version-1 trust bundle")
        if set(d) - {"v", "type", "roots", "keylist"}:
            raise WireError("unknown trust bundle fields")
        roots, keylist = d.get("roots"), d.get("keylist")
        if not isinstance(roots, list) or not roots or len(roots) > MAX_ROOTS:
            raise WireError(f"trust bundle needs 1-{MAX_ROOTS} roots")
        if not all(isinstance(r, dict) for r in roots) or not isinstance(keylist, dict):
            raise WireError("trust bundle entries must be signed envelopes")
        return cls(tuple(roots), keylist)


# -- the pure verifier -------------------------------------------------------------------------
@dataclass
class TrustStore:
    """Pinned root + current key list; every update rule lives here, no I/O.

    Invariants: ``root`` only ever moves to version + 1 with both signatures; ``keylist``
    version never goes down; ``online_keys(now)`` refuses an expired list.
    """

    root: RootMetadata
    root_envelope: dict[str, Any]
    keylist: KeyList | None = None
    keylist_envelope: dict[str, Any] | None = None
    _chain: list[dict[str, Any]] = field(default_factory=list)

    # construction ---------------------------------------------------------------------------
    @classmethod
    def pin(cls, root_data: bytes | dict[str, Any]) -> TrustStore:
        """Trust on first use of a root (at enrollment): it must be validly self-signed."""
        env = parse_json_object(root_data, max_bytes=MAX_TRUST_BYTES) if isinstance(
            root_data, bytes) else root_data
        root = verify_self_signed_root(env)
        return cls(root, env, _chain=[env])

    def to_state(self) -> bytes:
        """What the agent persists (durably) after each accepted update."""
        return canonical_json({
            "v": TRUST_VERSION, "type": "trust-state", "roots": list(self._chain),
            "keylist": self.keylist_envelope,
        })

    @classmethod
    def from_state(cls, data: bytes) -> TrustStore:
        """Restore from ``to_state()``, re-verifying the chain. The stored key list is taken
        whatever its age: expiry is checked when its keys are used (``online_keys``)."""
        d = parse_json_object(data, max_bytes=MAX_TRUST_BYTES * 4)
        if d.get("v") != TRUST_VERSION or d.get("type") != "trust-state":
            raise WireError("not a version-1 trust state")
        roots = d.get("roots")
        if not isinstance(roots, list) or not roots or len(roots) > MAX_ROOTS:
            raise WireError("trust state needs a root chain")
        store = cls.pin(roots[0])
        for env in roots[1:]:
            store.update_root(env)
        if d.get("keylist") is not None:
            store._accept_keylist(d["keylist"], now=None)
        return store

    # updates --------------------------------------------------------------------------------
    def update_root(self, data: bytes | dict[str, Any]) -> RootMetadata:
        """Rotate to root version + 1, which both the current and the new root signed.

        After a rotation, a key list the new root did not sign is dropped.
        """
        env = parse_json_object(data, max_bytes=MAX_TRUST_BYTES) if isinstance(
            data, bytes) else data
        payload, _ = _split_envelope(env)
        new = RootMetadata.from_wire(payload)
        if new.version != self.root.version + 1:
            raise VerificationError(
                f"root v{new.version} does not follow the trusted root v{self.root.version}")
        _require(env, self.root.keys, self.root.threshold,
                 f"root v{new.version} (signatures of root v{self.root.version})")
        _require(env, new.keys, new.threshold, f"root v{new.version} (its own signatures)")
        self.root, self.root_envelope = new, env
        self._chain.append(env)
        if self.keylist_envelope is not None:
            _, n = _count_signers(self.keylist_envelope, new.keys)
            if n < new.threshold:
                self.keylist, self.keylist_envelope = None, None
        return new

    def update_keylist(self, data: bytes | dict[str, Any], now: int) -> KeyList:
        """Accept a key list signed by the current root: newer version, not expired.

        The same version with the same content is a no-op (a retained message re-delivered);
        the same version with other content is refused.
        """
        env = parse_json_object(data, max_bytes=MAX_TRUST_BYTES) if isinstance(
            data, bytes) else data
        return self._accept_keylist(env, now=now)

    def _accept_keylist(self, env: Any, *, now: int | None) -> KeyList:
        payload = _require(env, self.root.keys, self.root.threshold, "keylist")
        new = KeyList.from_wire(payload)
        if self.keylist is not None:
            if new.version < self.keylist.version:
                raise VerificationError(
                    f"keylist v{new.version} is older than the trusted v{self.keylist.version}")
            if new.version == self.keylist.version:
                if canonical_json(payload) != canonical_json(
                        self.keylist_envelope["payload"]):  # type: ignore[index]
                    raise VerificationError(
                        f"keylist v{new.version} differs from the trusted one of that version")
                return self.keylist
        if now is not None and new.expires_at <= now:
            raise VerificationError(f"keylist v{new.version} expired at {new.expires_at}")
        self.keylist, self.keylist_envelope = new, env
        return new

    def apply_bundle(self, data: bytes, now: int) -> KeyList:
        """Walk the roots newer than the trusted one, then take the bundle's key list.

        Roots at or below the trusted version are skipped only if they are byte-identical to
        the chain already trusted (a fork of history is refused).
        """
        bundle = TrustBundle.from_bytes(data)
        for env in bundle.roots:
            payload, _ = _split_envelope(env)
            version = RootMetadata.from_wire(payload).version
            if version <= self.root.version:
                known = self._chain_entry(version)
                if known is not None and canonical_json(known["payload"]) != canonical_json(
                        payload):
                    raise VerificationError(f"root v{version} differs from the trusted one")
                continue
            self.update_root(env)
        return self.update_keylist(bundle.keylist, now)

    def _chain_entry(self, version: int) -> dict[str, Any] | None:
        first = RootMetadata.from_wire(self._chain[0]["payload"]).version
        i = version - first
        return self._chain[i] if 0 <= i < len(self._chain) else None

    # use ------------------------------------------------------------------------------------
    def online_keys(self, now: int) -> list[Ed25519PublicKey]:
        """The keys that may sign manifests now; refuses a missing or expired key list."""
        if self.keylist is None:
            raise VerificationError("no trusted key list yet")
        if self.keylist.expires_at <= now:
            raise VerificationError(
                f"trusted keylist v{self.keylist.version} expired at {self.keylist.expires_at}")
        return self.keylist.public_keys()

    def verify_manifest_envelope(self, data: bytes, now: int, *, max_bytes: int = 256 * 1024
                                 ) -> dict[str, Any]:
        """Size cap, then ``threshold`` signatures by current online keys; returns the payload.

        Shape, version, expiry and binding checks of the payload are the caller's next steps.
        """
        if len(data) > max_bytes:
            raise WireError(f"manifest of {len(data)} bytes exceeds the {max_bytes}-byte cap")
        keys = {key_id(k): k for k in self.online_keys(now)}
        assert self.keylist is not None
        return verify_with_threshold(data, keys, self.keylist.threshold, max_bytes=max_bytes)

    def bundle(self) -> TrustBundle:
        if self.keylist_envelope is None:
            raise VerificationError("no trusted key list yet")
        return TrustBundle(tuple(self._chain), self.keylist_envelope)


__all__ = [
    "MAX_TRUST_BYTES",
    "TRUST_VERSION",
    "KeyList",
    "RootMetadata",
    "TrustBundle",
    "TrustStore",
    "decode_public_key",
    "encode_public_key",
    "sign_payload",
    "trust_topic",
    "verify_self_signed_root",
    "verify_with_threshold",
]
