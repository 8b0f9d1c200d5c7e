"""Building and signing the desired-state manifest of one device and model.

A manifest names exactly one artifact (full or delta, with its chunk hashes) and the target it
must produce, and carries the rollout's trial limits, the model's IO contract and its golden
inputs. ``manifest_id`` is random and unique; ``serial`` is the device's next one (the caller
bumps it, a device refuses any serial it has passed); ``expires_at`` is ``issued_at`` plus the
server's manifest TTL.
"""

from __future__ import annotations

import time
import uuid

from deltafleet.shared import ArtifactRef, Manifest, SigningKey

from ..planner import VariantOption
from ..policy import RolloutPolicy


def build_manifest(*, device_id: str, hardware_id: str | None, serial: int, rollout_id: int,
                   model: str, version: str, option: VariantOption, artifact: ArtifactRef,
                   base_sha256: str | None, policy: RolloutPolicy, ttl_s: int,
                   issued_at: int | None = None, manifest_id: str | None = None) -> Manifest:
    """The manifest that installs ``option`` (of ``model`` ``version``) from ``artifact``;
    ``base_sha256`` only when the artifact is a delta."""
    issued = int(time.time()) if issued_at is None else issued_at
    return Manifest(
        manifest_id=manifest_id or uuid.uuid4().hex, device_id=device_id, serial=serial,
        issued_at=issued, expires_at=issued + ttl_s, rollout_id=rollout_id,
        model=model, version=version, variant=option.name, format=option.format,
        target_sha256=option.sha256, target_size_bytes=option.size_bytes,
        base_sha256=base_sha256, artifact=artifact, trial_window_s=policy.health_window_s,
        health_policy=policy.health.to_wire(), hardware_id=hardware_id,
        allow_io_change=policy.allow_io_change, io_signature=option.io_signature,
        golden_inputs=option.golden,
    )


def sign_manifest(key: SigningKey, manifest: Manifest) -> bytes:
    """The signed envelope devices verify (and the bytes stored to re-send it)."""
    return key.sign_bytes(manifest.to_wire())
