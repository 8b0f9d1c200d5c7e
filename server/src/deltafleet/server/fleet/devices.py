"""Devices as the fleet reports them: hello upsert, presence and what each device runs.

What a device runs (``DeviceModel``: model, version, variant, sha256) comes only from what the
device verified and reported: its hello, or the sha256 an event says it runs now. An event's
version is the manifest's (what the device was asked to run), so it is never taken for what
runs unless the catalog agrees that version has that sha256: a failed or rolled back update
leaves the row as the device last reported it. ``DeviceModel.state`` is "trial" while the
device's last report for the model was a trial (it runs the model but has not committed to
it): a healthy or rolled back report clears it, and so does any report or hello of another
sha256; one that only restates the same sha256 (a hello, a rejection) leaves it. What a device
was asked to run is apart: ``desired_models`` (its latest rollout target per model that it does
not run, or runs only in a trial), which says ``waiting: device offline since ...`` for an
offline device whose open target waits for it.

Each function takes an open SQLAlchemy ``Session`` and never commits (the caller's
``Store.session()`` block is the transaction) and never prints. Anything read from a device is
untrusted: profile fields and labels are clipped to the column sizes, values of the wrong type
are dropped. Upserting the same hellos twice, or from two replicas at once, leaves the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, selectinload

from deltafleet.shared import Hello

from ..errors import NotFoundError
from ..reads import Desired, SessionReader, desired_for
from ..rollout.states import TargetState
from ..store.models import (
    Device,
    DeviceModel,
    Model,
    ModelVersion,
    Variant,
)

TRIAL = TargetState.TRIAL.value  # DeviceModel.state while the model runs in a trial
_SETTLED = (TargetState.HEALTHY.value, TargetState.ROLLED_BACK.value)  # reports ending one

__all__ = [
    "TRIAL",
    "Desired",
    "desired_models",
    "get_device",
    "list_devices",
    "record_device_model",
    "set_device_online",
    "set_devices_presence",
    "upsert_devices_from_hellos",
]


def _text(value: Any, limit: int) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if not isinstance(value, str | int | float):
        return None
    return str(value)[:limit]


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return min(value, 2**63 - 1)


def _str_map(value: Any, limit: int = 256) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {
        str(k)[:limit]: str(v)[:limit]
        for k, v in value.items()
        if isinstance(k, str) and isinstance(v, str | int | float) and not isinstance(v, bool)
    }


def upsert_devices_from_hellos(session: Session, hellos: list[Hello],
                               now: datetime) -> list[Device]:
    """Create or update the devices the hellos describe; each is online and was seen ``now``.

    A device's model rows are replaced by what its hello reports (a model it no longer
    reports is removed; an unchanged row keeps its ``updated_at``). Two SELECTs and one flush
    for the batch, whatever its size (the server ingests device traffic this way). A device
    appearing more than once in ``hellos`` ends with its last hello."""
    latest = {h.device_id: h for h in sorted(hellos, key=lambda h: h.device_id)}
    ids = sorted(latest)
    known = set(session.scalars(select(Device.id).where(Device.id.in_(ids))))
    # New devices are inserted first, in id order, skipping any another replica inserted a
    # moment ago (with $share/ subscriptions two replicas can see hellos of one new device):
    # no duplicate-key failure, no deadlock between replicas inserting overlapping batches.
    _insert_missing(session, Device, ["id"], [
        {"id": i, "created_at": now, "manifest_serial": 0} for i in ids if i not in known])
    devices = {d.id: d for d in session.scalars(
        select(Device).where(Device.id.in_(ids)).order_by(Device.id).with_for_update())}
    models: dict[str, dict[str, DeviceModel]] = {i: {} for i in ids}
    for row in session.scalars(select(DeviceModel).where(DeviceModel.device_id.in_(ids))):
        models[row.device_id][row.model_name] = row
    out = []
    for device_id, hello in latest.items():
        device = devices.get(device_id)
        if device is None:  # a dialect without ON CONFLICT: plain insert (single server)
            device = Device(id=device_id, created_at=now, manifest_serial=0)
            session.add(device)
        _apply_hello(session, device, models[device_id], hello, now)
        out.append(device)
    session.flush()
    return out


def _insert_missing(session: Session, table: type[Any], keys: list[str],
                    rows: list[dict[str, Any]]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING on PostgreSQL and SQLite; nothing elsewhere (the
    caller adds ORM objects for rows still missing)."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert  # noqa: PLC0415
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as upsert  # type: ignore[assignment]  # noqa: PLC0415
    else:
        return
    session.execute(upsert(table).values(rows).on_conflict_do_nothing(index_elements=keys))


def _apply_hello(session: Session, device: Device, existing: dict[str, DeviceModel],
                 hello: Hello, now: datetime) -> None:
    p = hello.profile
    device.hardware_id = _text(p.get("hardware_id"), 128)
    device.arch = _text(p.get("arch"), 32)
    device.os = _text(p.get("os"), 64)
    device.cpu = _text(p.get("cpu"), 128)
    device.memory_bytes = _count(p.get("memory_bytes"))
    device.accelerator = _text(p.get("accelerator"), 64)
    device.runtimes = _str_map(p.get("runtimes"), 64)
    device.disk_free_bytes = _count(p.get("disk_free_bytes"))
    device.labels = _str_map(hello.labels)
    device.agent_version = _text(hello.agent_version, 32)
    device.online = True
    device.last_seen = now

    reported = {m.model[:128]: m for m in hello.models}
    for name, gone in existing.items():
        if name not in reported:
            session.delete(gone)
    for name, m in reported.items():
        fields = {"version": m.version[:64], "variant": m.variant[:64], "sha256": m.sha256}
        current = existing.get(name)
        if current is None:
            session.add(DeviceModel(device_id=hello.device_id, model_name=name,
                                    updated_at=now, **fields))
        elif any(getattr(current, k) != v for k, v in fields.items()):
            if current.sha256 != m.sha256:
                current.state = None  # another model than the one in trial
            for k, v in fields.items():
                setattr(current, k, v)
            current.updated_at = now


def set_devices_presence(session: Session, presence: dict[str, bool], now: datetime) -> None:
    """Batch presence/heartbeat update: one UPDATE per distinct value, unknown ids ignored."""
    for online in (True, False):
        ids = [d for d, o in presence.items() if o is online]
        if ids:
            session.execute(update(Device).where(Device.id.in_(ids))
                            .values(online=online, last_seen=now))


def set_device_online(session: Session, device_id: str, online: bool, now: datetime) -> None:
    """Record presence (last will or status); does nothing for a device never seen."""
    device = session.get(Device, device_id)
    if device is None:
        return
    device.online = online
    device.last_seen = now


def record_device_model(
    session: Session,
    device_id: str,
    model_name: str,
    version: str | None,
    variant: str | None,
    sha256: str,
    now: datetime,
    report: str | None = None,
) -> DeviceModel | None:
    """Record that a device now runs ``sha256`` for ``model_name``, as its event of state
    ``report`` says.

    The same sha256 as recorded leaves the row as it is (the device's own report of version
    and variant stands), but for its trial state: a ``trial`` report sets it, a ``healthy`` or
    ``rolled_back`` one clears it, any other leaves it. A new sha256 takes its version and
    variant from the catalog when the catalog has that artifact for the model
    (``version``/``variant`` only choose among several); else ``version`` and ``variant`` are
    kept as given; its trial state is set only by a ``trial`` report. Returns None, writing
    nothing, for a device never seen.
    """
    if session.get(Device, device_id) is None:
        return None
    row = session.get(DeviceModel, (device_id, model_name))
    trial = TRIAL if report == TRIAL else None
    if row is not None and row.sha256 == sha256:
        if report in (TRIAL, *_SETTLED) and row.state != trial:
            row.state = trial
            session.flush()
        return row
    known = session.execute(
        select(ModelVersion.version, Variant.name)
        .join(Variant, Variant.version_id == ModelVersion.id)
        .join(Model, Model.id == ModelVersion.model_id)
        .where(Model.name == model_name, Variant.artifact_sha256 == sha256)
        .order_by(ModelVersion.id.desc(), Variant.id)
    ).all()
    if known:
        chosen = next((k for k in known if k[0] == version and variant in (None, k[1])),
                      next((k for k in known if k[0] == version), known[0]))
        version, variant = chosen[0], chosen[1]
    if row is None:
        row = DeviceModel(device_id=device_id, model_name=model_name)
        session.add(row)
    row.version = version
    row.variant = variant
    row.sha256 = sha256
    row.state = trial
    row.updated_at = now
    session.flush()
    return row


def desired_models(session: Session, devices: list[Device]) -> dict[str, list[Desired]]:
    """Per device id: its latest rollout target per model that it does not run, or runs only
    in a trial, with why (``reads.desired_for``, the statement fleetctl runs without
    SQLAlchemy). Models must be loaded on ``devices``. One query."""
    return desired_for(SessionReader(session), devices)


def get_device(session: Session, device_id: str) -> Device:
    device = session.scalars(
        select(Device).where(Device.id == device_id).options(selectinload(Device.models))
    ).first()
    if device is None:
        raise NotFoundError(f"no device {device_id!r}")
    return device


def list_devices(session: Session, *, models: bool = True) -> list[Device]:
    """Every device (with its models loaded unless ``models`` is False), by id."""
    query = select(Device).order_by(Device.id)
    return list(session.scalars(query.options(selectinload(Device.models)) if models else query))
