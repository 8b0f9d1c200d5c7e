"""Which keys may sign manifests on this device: the I/O around ``shared.trust.TrustStore``.

Two modes, chosen by the config:

``root_of_trust`` (enrollment)
    At first start the root in ``root.json`` is pinned and the key list in ``trust.json``
    applied; the result (``TrustStore.to_state()``) is written durably to
    ``<state_dir>/trust-state.json`` and restored from there on every later start, so the
    files under /etc only matter once. Bundles on ``{prefix}/trust/keys`` move the state
    forward (root N -> N+1 signed by both roots, key list versions up only); each accepted
    one is persisted before it is used. A manifest verifies only with a key of the current,
    unexpired key list.
``trusted_keys`` (legacy / simple)
    The online public keys are pinned as files; no rotation, no key-list expiry.

Every rule lives in the pure ``TrustStore``; this module only reads, writes and logs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from deltafleet.shared import (
    KeyFileError,
    TrustStore,
    VerificationError,
    WireError,
    atomic_write_bytes,
    load_public_key,
    verify_envelope,
)

from .config import AgentConfig
from .errors import ConfigError, SignatureRejected, UpdateRejected

log = logging.getLogger(__name__)
STATE_FILE = "trust-state.json"


class ManifestVerifier(Protocol):
    def verify(self, data: bytes, now: int, max_bytes: int) -> dict[str, Any]:
        """Payload of a manifest envelope whose signature is trusted now, else raise
        UpdateRejected."""
        ...


class PinnedKeys:
    """Legacy mode: any one of the pinned online keys."""

    def __init__(self, keys: list[Ed25519PublicKey]) -> None:
        self.keys = keys

    def verify(self, data: bytes, now: int, max_bytes: int) -> dict[str, Any]:
        try:
            return verify_envelope(data, self.keys, max_bytes=max_bytes)
        except (VerificationError, WireError) as e:
            raise SignatureRejected(f"manifest refused: untrusted signature ({e})") from e


class RootTrust:
    """Root-of-trust mode: a ``TrustStore`` persisted in the state directory."""

    def __init__(self, store: TrustStore, state_file: Path) -> None:
        self.store = store
        self.state_file = state_file

    @classmethod
    def open(cls, cfg: AgentConfig, now: int) -> RootTrust:
        """Restore the persisted state, or pin ``root_of_trust`` (first start)."""
        state_file = Path(cfg.state_dir) / STATE_FILE
        if state_file.exists():
            try:
                trust = cls(TrustStore.from_state(state_file.read_bytes()), state_file)
            except (OSError, VerificationError, WireError) as e:
                raise ConfigError(f"trust state {state_file} is unusable ({e}); re-enroll the "
                                  "device or remove the file to pin root_of_trust again") from e
        else:
            assert cfg.root_of_trust is not None
            try:
                store = TrustStore.pin(Path(cfg.root_of_trust).read_bytes())
            except (OSError, VerificationError, WireError) as e:
                raise ConfigError(f"root_of_trust {cfg.root_of_trust} cannot be pinned: {e}"
                                  ) from e
            trust = cls(store, state_file)
            trust.persist()
            log.info("pinned root v%d from %s", store.root.version, cfg.root_of_trust)
        if cfg.trust_bundle is not None:
            try:
                trust.apply(Path(cfg.trust_bundle).read_bytes(), now)
            except (OSError, UpdateRejected) as e:  # e.g. older than what the device holds
                log.info("trust_bundle %s not applied: %s", cfg.trust_bundle, e)
        return trust

    def persist(self) -> None:
        atomic_write_bytes(self.state_file, self.store.to_state())

    def apply(self, bundle: bytes, now: int) -> bool:
        """Apply a trust bundle; True if the state moved (and was persisted).

        The bundle is applied to a copy, so a bundle refused half-way (say a good root
        rotation but a rolled-back key list) changes nothing.
        """
        before = self.store.to_state()
        candidate = TrustStore.from_state(before)
        try:
            candidate.apply_bundle(bundle, now)
        except (VerificationError, WireError) as e:
            raise UpdateRejected(f"trust bundle refused: {e}") from e
        after = candidate.to_state()
        if after == before:
            return False
        atomic_write_bytes(self.state_file, after)  # durable before it is used
        self.store = candidate
        kl = candidate.keylist
        log.warning("trust updated: root v%d, key list v%s (expires %s)", candidate.root.version,
                    kl.version if kl else "-", kl.expires_at if kl else "-")
        return True

    def verify(self, data: bytes, now: int, max_bytes: int) -> dict[str, Any]:
        try:
            return self.store.verify_manifest_envelope(data, now, max_bytes=max_bytes)
        except (VerificationError, WireError) as e:
            raise SignatureRejected(f"manifest refused: untrusted signature ({e})") from e


EXPECTED_KEY = "expected the server's Ed25519 signing public key (PEM, the server's signing.pub)"
MAX_KEY_FILE_BYTES = 64 << 10  # a PEM public key is ~113 bytes; anything huge is not one


def load_trusted_key(path: Path) -> Ed25519PublicKey:
    """The pinned key in ``path``, or ConfigError: one line naming the file, what is wrong
    with it (missing, a directory, unreadable, a private key, not PEM, not Ed25519) and what
    was expected."""
    path = Path(path)

    def refuse(problem: str) -> ConfigError:
        return ConfigError(f"trusted key {path}: {problem}; {EXPECTED_KEY}")

    if path.is_dir():
        raise refuse("is a directory")
    if not path.exists():
        raise refuse("no such file")
    try:
        with open(path, "rb") as f:
            pem = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise refuse(f"cannot be read ({e.strerror or e})") from e
    if len(pem) > MAX_KEY_FILE_BYTES:
        raise refuse(f"is larger than {MAX_KEY_FILE_BYTES >> 10} KiB")
    if b"PRIVATE KEY-----" in pem:
        raise refuse("is a private key (never copy it to a device)")
    if b"-----BEGIN PUBLIC KEY-----" not in pem:
        raise refuse("is not a PEM public key" if pem.strip() else "is empty")
    try:
        return load_public_key(pem)
    except KeyFileError as e:
        problem = ("is not an Ed25519 key" if "not Ed25519" in str(e)
                   else "is not a valid PEM public key")
        raise refuse(problem) from e


def open_trust(cfg: AgentConfig, now: int) -> PinnedKeys | RootTrust:
    if cfg.root_of_trust is not None:
        return RootTrust.open(cfg, now)
    return PinnedKeys([load_trusted_key(p) for p in cfg.trusted_keys])
