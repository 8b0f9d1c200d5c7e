"""Test data factories: a valid object by default, every field overridable.

``manifest(**overrides)`` is a well-formed ``Manifest`` for model "m" v2 on "dev-1" that has not
expired; pass ``target=`` and ``artifact=`` bytes to make its hashes and sizes describe them
(``artifact`` defaults to the target itself, shipped "full"/"identity"). ``signed_manifest(key,
**overrides)`` is the same manifest and its signed envelope, as the server publishes it.
"""

from __future__ import annotations

import time
from typing import Any

from deltafleet.shared import ArtifactRef, Manifest, SigningKey, sha256_bytes

__all__ = ["CHUNK_BYTES", "artifact_ref", "manifest", "signed_manifest"]

CHUNK_BYTES = 65536
TARGET = b"target model bytes"


def artifact_ref(data: bytes, *, kind: str = "full", codec: str = "identity",
                 chunk_bytes: int = CHUNK_BYTES,
                 chunks: tuple[str, ...] | None = None) -> ArtifactRef:
    """The reference to ``data``: its sha256, size and (unless given) per-chunk hashes."""
    if chunks is None:
        chunks = tuple(sha256_bytes(data[i:i + chunk_bytes])
                       for i in range(0, len(data), chunk_bytes))
    return ArtifactRef(kind, codec, sha256_bytes(data), len(data), chunk_bytes, chunks)


def manifest(*, target: bytes = TARGET, artifact: bytes | ArtifactRef | None = None,
             **overrides: Any) -> Manifest:
    """A valid manifest for ``target`` shipped as ``artifact``; ``overrides`` replace fields."""
    if artifact is None:
        artifact = artifact_ref(target)
    elif isinstance(artifact, bytes):
        artifact = artifact_ref(artifact)
    fields: dict[str, Any] = dict(
        manifest_id="m1", device_id="dev-1", serial=1, issued_at=0,
        expires_at=int(time.time()) + 600, rollout_id=1, model="m", version="v2",
        variant="default", format="onnx", target_sha256=sha256_bytes(target),
        target_size_bytes=len(target), base_sha256=None, artifact=artifact,
    )
    fields.update(overrides)
    return Manifest(**fields)


def signed_manifest(key: SigningKey, **overrides: Any) -> tuple[Manifest, bytes]:
    """``manifest(**overrides)`` and its envelope signed with ``key``."""
    m = manifest(**overrides)
    return m, key.sign_bytes(m.to_wire())
