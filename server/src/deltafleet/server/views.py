"""JSON views of fleet, catalog and audit rows, the one rendering that ``fleetctl ... --json`` prints.

Each function turns loaded ORM rows into plain JSON-able dicts and does no query of its own
(relationships must be loaded by the caller, see ``fleet.get_device`` and
``catalog.get_model``). Times are ISO 8601 in UTC; the key sets are a stable CLI contract.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .fleet import Desired
    from .reads import DeviceRow
    from .store.models import AuditEntry, Device, Group, Model, Variant

__all__ = [
    "asked_line",
    "audit_to_json",
    "desired_to_json",
    "device_to_json",
    "group_to_json",
    "model_to_json",
    "variant_to_json",
]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def desired_to_json(d: Desired) -> dict[str, Any]:
    """What a device was asked to run and does not run, and why (see fleet.desired_models)."""
    return {
        "model": d.model,
        "version": d.version,
        "variant": d.variant,
        "sha256": d.sha256,
        "rollout_id": d.rollout_id,
        "rollout_state": d.rollout_state,
        "open": d.open,
        "state": d.state,
        "reason": d.reason,
        "waiting": d.waiting or None,
        "why": _why(d.state, d.reason, d.rollout_state, d.open, d.waiting),
        "updated_at": _iso(d.updated_at),
    }


def _why(state: str, reason: str, rollout_state: str, is_open: bool, waiting: str = "") -> str:
    """``pending: waiting: device offline since <time>; the update is sent when it
    reconnects (<reason>)`` for an offline device, else ``<state>: <reason>``."""
    if waiting:
        then = ("the update is sent when it reconnects" if state in ("pending", "held")
                else "the manifest waits for it at the broker")
        text = f"{state}: waiting: {waiting}; {then}" + (f" ({reason})" if reason else "")
    else:
        text = f"{state}: {reason}" if reason else state
    return text if is_open else f"{text} (rollout {rollout_state})"


def asked_line(d: Mapping[str, Any]) -> str:
    """One desired entry as a sentence: ``detector:v5 by rollout 7 - held: <reason>``."""
    return f"{d['model']}:{d['version'] or '?'} by rollout {d['rollout_id']} - {d['why']}"


def device_to_json(device: Device | DeviceRow, desired: list[Desired] | None = None) -> dict[str, Any]:
    """A device as a JSON-able dict: an ORM row (its models must be loaded, see get_device)
    or a ``reads.DeviceRow``.

    ``running`` (also ``models``) is what the device last verified and reported (``state``
    "trial" while it runs the model in a trial, not committed yet, else None); ``desired``
    what its rollouts asked of it that it does not run, with why (``fleet.desired_models``;
    ``waiting`` says when the device is offline).
    """
    models: list[Any] = list(device.models)
    running = [
        {
            "model": m.model_name,
            "version": m.version,
            "variant": m.variant,
            "sha256": m.sha256,
            "state": m.state,
            "updated_at": _iso(m.updated_at),
        }
        for m in sorted(models, key=lambda m: m.model_name)
    ]
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
        "models": running,
        "running": running,
        "desired": [desired_to_json(d) for d in desired or []],
        "manifest_serial": device.manifest_serial,
        "created_at": _iso(device.created_at),
    }


def variant_to_json(variant: Variant, *, detail: bool = True) -> dict[str, Any]:
    from .catalog import io_signature  # noqa: PLC0415 - the catalog loads the codecs

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
    from .catalog import compressed_artifact  # noqa: PLC0415

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
        "selector": {k: list(v) if isinstance(v, list) else v
                     for k, v in (group.selector or {}).items()},
        "created_at": _iso(group.created_at),
    }
    if device_ids is not None:
        out["devices"] = device_ids
    return out


def group_show_json(s: Any, name: str) -> dict[str, Any]:
    """`fleetctl group show --json` (and the API's): the selector and each member as a device."""
    from . import fleet  # noqa: PLC0415

    group = fleet.get_group(s, name)
    members = fleet.devices_in_group(s, name)
    desired = fleet.desired_models(s, members)
    out = group_to_json(group, [d.id for d in members])
    out["members"] = [device_to_json(d, desired[d.id]) for d in members]
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


def device_detail_json(s: Any, device_id: str) -> dict[str, Any]:
    """`fleetctl device show --json` (and GET /devices/ID): the device, what it was asked to
    run, its portrait and its own benchmarks."""
    from . import fleet
    from .fleet.portraits import device_portrait_json

    d = fleet.get_device(s, device_id)
    return {**device_to_json(d, fleet.desired_models(s, [d])[d.id]),
            **device_portrait_json(s, d.id)}
