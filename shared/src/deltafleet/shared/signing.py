"""Ed25519 signing of canonical-JSON payloads.

A signed envelope on the wire::

    {"v": 1, "payload": {...}, "signatures": [{"keyid": "<hex>", "sig": "<base64>"}]}

The signature covers ``canonical_json(payload)``. ``keyid`` is the sha256 of the raw 32-byte
public key, so a verifier can pick the right pinned key without trusting anything else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .canonical import canonical_json, parse_json_object
from .durable import atomic_write_bytes
from .errors import KeyFileError, VerificationError, WireError

ENVELOPE_VERSION = 1


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True, slots=True)
class SigningKey:
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def keyid(self) -> str:
        return key_id(self.public_key)

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def save(self, private_path: Path, public_path: Path) -> None:
        """Write the key pair; the private key file is created with mode 0600."""
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write_bytes(private_path, pem, mode=0o600)
        atomic_write_bytes(public_path, self.public_pem(), mode=0o644)

    @classmethod
    def load(cls, private_path: Path) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(Path(private_path).read_bytes(), None)
        except (OSError, ValueError, TypeError) as e:
            raise KeyFileError(f"cannot load signing key {private_path}: {e}") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{private_path} is not an Ed25519 private key")
        return cls(key)

    def sign(self, payload: dict[str, Any]) -> dict[str, Any]:
        sig = self.private_key.sign(canonical_json(payload))
        return {
            "v": ENVELOPE_VERSION,
            "payload": payload,
            "signatures": [{"keyid": self.keyid, "sig": base64.b64encode(sig).decode()}],
        }

    def sign_bytes(self, payload: dict[str, Any]) -> bytes:
        return canonical_json(self.sign(payload))


def load_public_key(path_or_pem: Path | bytes) -> Ed25519PublicKey:
    try:
        pem = path_or_pem if isinstance(path_or_pem, bytes) else Path(path_or_pem).read_bytes()
        key = serialization.load_pem_public_key(pem)
    except (OSError, ValueError, TypeError) as e:
        raise KeyFileError(f"cannot load public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError("public key is not Ed25519")
    return key


def verify_envelope(
    data: bytes, trusted: list[Ed25519PublicKey], *, max_bytes: int = 1 << 20
) -> dict[str, Any]:
    """Return the payload of a signed envelope if one trusted key signed it.

    Raises WireError for a malformed envelope and VerificationError for a signature that no
    trusted key made. The payload is only returned, never acted on, before this succeeds.
    """
    env = parse_json_object(data, max_bytes=max_bytes)
    if env.get("v") != ENVELOPE_VERSION:
        raise WireError(f"unsupported envelope version {env.get('v')!r}")
    payload, sigs = env.get("payload"), env.get("signatures")
    if not isinstance(payload, dict) or not isinstance(sigs, list) or not sigs:
        raise WireError("envelope needs an object payload and a non-empty signatures list")
    message = canonical_json(payload)
    by_id = {key_id(k): k for k in trusted}
    for entry in sigs:
        if not isinstance(entry, dict):
            raise WireError("signature entry is not an object")
        kid = entry.get("keyid")
        key = by_id.get(kid) if isinstance(kid, str) else None  # a list keyid is unhashable
        sig = entry.get("sig")
        if key is None or not isinstance(sig, str):
            continue
        try:
            key.verify(base64.b64decode(sig, validate=True), message)
        except (InvalidSignature, binascii.Error, ValueError):
            continue
        return payload
    raise VerificationError("manifest signature does not verify with any trusted key")
