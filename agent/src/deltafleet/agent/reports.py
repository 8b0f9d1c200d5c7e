"""Reports: events built from the machine's ``Report`` effects, with stable ids.

An event id is stable per (device, manifest, state or ``id_key``): a re-sent or re-made report
has the same id, so the server applies it once. A manifest refused before it verified has no
trusted id; its report's id is the hash of its bytes. The fleet simulator builds its events
here too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection

from deltafleet.shared import DeltafleetError, Event, Manifest, parse_json_object

from . import machine as mc
from .errors import SignatureRejected, UpdateRejected
from .machine import Report
from .update import MAX_MANIFEST_BYTES


def event_id(device_id: str, manifest_id: str, state: str) -> str:
    """Stable per (device, manifest, state): a re-sent or re-made report has the same id."""
    return hashlib.sha256(f"{device_id}|{manifest_id}|{state}".encode()).hexdigest()[:32]


def build_event(device_id: str, r: Report, running_sha256: str | None) -> Event:
    """``r.id_key`` (default the state) makes the id: disk-space reports use their own, so the
    final outcome of the same manifest is never taken as a re-send."""
    m = r.manifest
    return Event(
        event_id=event_id(device_id, m.manifest_id, r.id_key or r.state),
        device_id=device_id, manifest_id=m.manifest_id, rollout_id=m.rollout_id,
        model=m.model, version=m.version, state=r.state, reason=r.reason,
        sha256=running_sha256 if r.running_sha else r.sha256,
        bytes_received=r.bytes_received, chunks_total=len(m.artifact.chunks),
        chunks_reused=r.chunks_reused, health={k: int(v) for k, v in r.health.items()},
    )


def rejected_event(device_id: str, model: str, reason: str, raw: bytes,
                   running_sha256: str | None) -> Event:
    return Event(
        event_id=hashlib.sha256(b"rejected|" + raw).hexdigest()[:32], device_id=device_id,
        manifest_id=None, rollout_id=None, model=model, version=None, state="rejected",
        reason=reason, sha256=running_sha256,
    )


def claimed_manifest_id(payload: bytes) -> str | None:
    """The manifest_id an envelope claims, unverified: only ever used to stay quiet."""
    try:
        env = parse_json_object(payload, max_bytes=MAX_MANIFEST_BYTES)
        mid = env.get("payload", {}).get("manifest_id")
    except (DeltafleetError, AttributeError):
        return None
    return mid if isinstance(mid, str) else None


def manifest_event(machine: mc.UpdateMachine, model: str, payload: bytes, device: mc.Device,
                   verify: Callable[[bytes, Collection[str]], Manifest], *,
                   hold_on_signature: bool = False) -> mc.ManifestVerified | mc.ManifestRejected:
    """The machine's event for a manifest on ``desired/<model>``: verified by ``verify``
    (``update.verify_manifest``, steps 1-5, given the ids the machine knows) or rejected with
    the reason; a signature refusal is held for the next trust update when
    ``hold_on_signature`` (a root of trust). The agent and the fleet simulator both use it."""
    try:
        m = verify(payload, machine.known_ids(model, device))
    except UpdateRejected as e:
        hold = hold_on_signature and isinstance(e, SignatureRejected)
        return mc.ManifestRejected(model, payload, str(e), claimed_manifest_id(payload), device,
                                   hold)
    return mc.ManifestVerified(model, m, payload, device)
