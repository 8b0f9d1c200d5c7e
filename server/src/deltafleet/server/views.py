"""JSON views of fleet, catalog and audit rows, the one rendering that ``fleetctl ... --json`` prints.

Each function turns loaded ORM rows into plain JSON-able dicts and does no query of its own
(relationships must be loaded by the caller, see ``fleet.get_device`` and
``catalog.get_model``). Times are ISO 8601 in UTC; the key sets are a stable CLI contract.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .catalog import compressed_artifact, io_signature
from .store.models import AuditEntry, Device, Group, Model, Variant

__all__ = ["audit_to_json", "device_to_json", "group_to_json", "model_to_json", "variant_to_json"]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def device_to_json(device: Device) -> dict[str, Any]:
    """A device as a JSON-able dict (its models must be loaded, see get_device)."""
    return {
        "id": device.id,
        "hardware_id": device.hardware_id,
        "online": bool(device.online),
        "last_seen": _iso(device.last_seen),
        "agent_version": device.agent_version,
        "labels": dict(device.labels or {}),
        "profile": {
            "arch": device.arch,
            "os": device.os,
            "cpu": device.cpu,
            "memory_bytes": device.memory_bytes,
            "accelerator": device.accelerator,
            "runtimes": dict(device.runtimes or {}),
            "disk_free_bytes": device.disk_free_bytes,
        },
        "models": [
            {
                "model": m.model_name,
                "version": m.version,
                "variant": m.variant,
                "sha256": m.sha256,
                "updated_at": _iso(m.updated_at),
            }
            for m in sorted(device.models, key=lambda m: m.model_name)
        ],
        "manifest_serial": device.manifest_serial,
        "created_at": _iso(device.created_at),
    }


def variant_to_json(variant: Variant, *, detail: bool = True) -> dict[str, Any]:
    info = variant.info or {}
    out: dict[str, Any] = {
        "name": variant.name,
        "format": variant.format,
        "precision": variant.precision,
        "sha256": variant.artifact_sha256,
        "size_bytes": info.get("size_bytes"),
        "compressed": _compressed_json(info),
        "golden_inputs": len(info.get("golden") or []),
        "created_at": _iso(variant.created_at),
    }
    if detail:
        out["inputs"] = info.get("inputs", [])
        out["outputs"] = info.get("outputs", [])
        out["io_signature"] = io_signature(info)  # what manifests sign (None: not signed)
        out["info"] = {k: v for k, v in info.items() if k != "golden"}
    return out


def _compressed_json(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a full install ships besides the model itself (None: the model as it is)."""
    c = compressed_artifact(info)
    return None if c is None else {"codec": c.codec, "sha256": c.sha256,
                                   "size_bytes": c.size_bytes}


def model_to_json(model: Model, *, detail: bool = True) -> dict[str, Any]:
    """A model with its versions and variants (loaded, see get_model) as a JSON-able dict."""
    versions = sorted(model.versions, key=lambda v: v.id)
    return {
        "name": model.name,
        "created_at": _iso(model.created_at),
        "latest": versions[-1].version if versions else None,
        "versions": [
            {
                "version": v.version,
                "created_at": _iso(v.created_at),
                "variants": [
                    variant_to_json(x, detail=detail)
                    for x in sorted(v.variants, key=lambda x: x.id)
                ],
            }
            for v in versions
        ],
    }


def group_to_json(group: Group, device_ids: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": group.name,
        "selector": dict(group.selector or {}),
        "created_at": _iso(group.created_at),
    }
    if device_ids is not None:
        out["devices"] = device_ids
    return out


def audit_to_json(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "at": _iso(entry.at),
        "actor": entry.actor,
        "action": entry.action,
        "subject": entry.subject,
        "details": entry.details or {},
    }
