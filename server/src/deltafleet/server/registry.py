"""Registry services: devices, groups, models and the audit log.

Pure database functions shared by fleetctl and the server daemon. Each takes an open SQLAlchemy
``Session`` and never commits (the caller's ``Store.session()`` block is the transaction) and
never prints. Invalid input raises UsageError (or NotFoundError / ConflictError); anything read
from a device is treated as untrusted and clipped to the column sizes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from deltafleet.agent.codecs import ZSTD
from deltafleet.shared import Hello, is_sha256

from .catalog import inspect_model, io_signature, load_golden
from .codecs import build_compressed_full
from .errors import ConflictError, NotFoundError, UsageError
from .planner import FullArtifact, VariantOption
from .planner import full_artifact as resolve_full
from .store.blobs import BlobStore
from .store.models import (
    Artifact,
    AuditEntry,
    Delta,
    Device,
    DeviceModel,
    Group,
    Model,
    ModelVersion,
    Variant,
)

MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
VARIANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
GROUP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SELECTOR_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,63}$")
PRECISIONS = ("fp32", "fp16", "int8")
PROFILE_SELECTOR_KEYS = ("arch", "os", "accelerator", "cpu")
NEW_BLOBS_KEY = "deltafleet.new_blobs"  # session.info: blobs this transaction wrote first
COMPRESSED_KIND = "compressed"  # artifacts.kind of a model's compressed form (full installs)


# ------------------------------------------------------------------------------- devices


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


def upsert_device_from_hello(session: Session, hello: Hello, now: datetime) -> Device:
    """Create or update the device a hello describes; it is online and was seen ``now``.

    The device's model rows are replaced by what the hello reports (a model it no longer
    reports is removed; an unchanged row keeps its ``updated_at``).
    """
    return upsert_devices_from_hellos(session, [hello], now)[0]


def upsert_devices_from_hellos(session: Session, hellos: list[Hello],
                               now: datetime) -> list[Device]:
    """Batch form of ``upsert_device_from_hello``: two SELECTs and one flush for the batch,
    whatever its size (the server ingests device traffic this way). A device appearing more
    than once in ``hellos`` ends with its last hello."""
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
) -> DeviceModel | None:
    """Record that a device now runs ``sha256`` for ``model_name``.

    A variant of None is looked up from the catalog by sha256 (if the model has a variant with
    that artifact). Returns None, writing nothing, for a device never seen.
    """
    if session.get(Device, device_id) is None:
        return None
    if variant is None:
        variant = session.scalars(
            select(Variant.name)
            .join(ModelVersion, ModelVersion.id == Variant.version_id)
            .join(Model, Model.id == ModelVersion.model_id)
            .where(Model.name == model_name, Variant.artifact_sha256 == sha256)
            .limit(1)
        ).first()
    row = session.get(DeviceModel, (device_id, model_name))
    if row is None:
        row = DeviceModel(device_id=device_id, model_name=model_name)
        session.add(row)
    row.version = version
    row.variant = variant
    row.sha256 = sha256
    row.updated_at = now
    session.flush()
    return row


def get_device(session: Session, device_id: str) -> Device:
    device = session.scalars(
        select(Device).where(Device.id == device_id).options(selectinload(Device.models))
    ).first()
    if device is None:
        raise NotFoundError(f"no device {device_id!r}")
    return device


def list_devices(session: Session) -> list[Device]:
    """Every device with its models loaded, by id."""
    return list(
        session.scalars(select(Device).options(selectinload(Device.models)).order_by(Device.id))
    )


# -------------------------------------------------------------------------------- groups


def _selector_value(device: Device, key: str) -> str | None:
    profile = key in PROFILE_SELECTOR_KEYS
    value = getattr(device, key) if profile else (device.labels or {}).get(key)
    return None if value is None else str(value)


def device_matches(device: Device, selector: Mapping[str, Any]) -> bool:
    """True if every selector entry equals the device's value (an empty selector matches all).

    Keys arch, os, accelerator and cpu name profile fields; any other key names a label.
    """
    return all(_selector_value(device, k) == str(v) for k, v in selector.items())


def check_selector(selector: Mapping[str, Any]) -> dict[str, str]:
    """Validate a selector (label or profile key -> string value); UsageError otherwise."""
    out: dict[str, str] = {}
    for key, value in selector.items():
        if not isinstance(key, str) or not SELECTOR_KEY_RE.match(key):
            raise UsageError(f"invalid selector key {key!r}: use letters, digits, '.', '_', '-'")
        if not isinstance(value, str) or not value or len(value) > 256:
            raise UsageError(f"invalid value for selector key {key!r}: use 1-256 characters")
        out[key] = value
    return out


def create_group(session: Session, name: str, selector: Mapping[str, Any]) -> Group:
    if not GROUP_NAME_RE.match(name):
        raise UsageError(
            f"invalid group name {name!r}: use 1-64 letters, digits, '.', '_' or '-'"
        )
    selector = check_selector(selector)
    if session.scalars(select(Group).where(Group.name == name)).first() is not None:
        raise ConflictError(f"group {name!r} already exists")
    group = Group(name=name, selector=selector, created_at=datetime.now(UTC))
    session.add(group)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError as e:
        raise ConflictError(f"group {name!r} already exists") from e
    return group


def list_groups(session: Session) -> list[Group]:
    return list(session.scalars(select(Group).order_by(Group.name)))


def get_group(session: Session, name: str) -> Group:
    group = session.scalars(select(Group).where(Group.name == name)).first()
    if group is None:
        raise NotFoundError(f"no group {name!r}")
    return group


def devices_in_group(session: Session, group_name: str) -> list[Device]:
    """The devices a group's selector matches now (models loaded), by id."""
    group = get_group(session, group_name)
    return [d for d in list_devices(session) if device_matches(d, group.selector)]


# -------------------------------------------------------------------------------- models


def _check_name(kind: str, value: str, pattern: re.Pattern[str], rule: str) -> None:
    if not isinstance(value, str) or not pattern.match(value):
        raise UsageError(f"invalid {kind} {value!r}: {rule}")


def add_model_version(
    session: Session,
    blobs: BlobStore,
    name: str,
    version: str,
    file: Path,
    variant: str = "default",
    precision: str = "fp32",
    golden: list[Path] | None = None,
) -> Variant:
    """Register ``file`` as variant ``variant`` of model ``name`` at ``version``.

    ``golden``: ``.npz`` files of inputs (one array per model input) that devices warm the
    model up on and probe it with during its trial; they travel in every manifest.

    Order: validate names -> inspect the file (CatalogError for anything not a valid model) ->
    refuse an existing (model, version, variant) with ConflictError -> store the blob -> build
    its compressed form (``_compressed_form``) -> add the rows. So every refusal happens
    before anything is written. Blobs this call wrote for the first time are listed in
    ``session.info[NEW_BLOBS_KEY]`` so a caller whose commit fails can remove them again.
    Adding another variant to an existing version is allowed.
    """
    _check_name("model name", name, MODEL_NAME_RE,
                "use 1-64 lowercase letters, digits, '.', '_' or '-', starting alphanumeric")
    _check_name("version", version, VERSION_RE,
                "use 1-64 letters, digits, '.', '_', '+' or '-', starting alphanumeric")
    _check_name("variant", variant, VARIANT_RE,
                "use 1-64 letters, digits, '.', '_' or '-', starting alphanumeric")
    if precision not in PRECISIONS:
        raise UsageError(f"invalid precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    file = Path(file)
    if not file.is_file():
        raise UsageError(f"no such file: {file}")

    info = inspect_model(file)
    golden_inputs = load_golden([Path(g) for g in golden or []], info.inputs)

    model = session.scalars(select(Model).where(Model.name == name)).first()
    mv = None
    if model is not None:
        mv = session.scalars(
            select(ModelVersion).where(
                ModelVersion.model_id == model.id, ModelVersion.version == version
            )
        ).first()
    if mv is not None:
        clash = session.scalars(
            select(Variant).where(Variant.version_id == mv.id, Variant.name == variant)
        ).first()
        if clash is not None:
            raise ConflictError(
                f"{name}:{version} already has variant {variant!r}; "
                "versions are immutable, add a new version"
            )

    was_stored = blobs.has(info.sha256)
    sha, size = blobs.put_file(file)
    if not was_stored:
        session.info.setdefault(NEW_BLOBS_KEY, set()).add(sha)
    if sha != info.sha256:
        raise UsageError(f"{file} changed while it was being added; try again")
    compressed = _compressed_form(session, blobs, sha)
    variant_info = info.to_json()
    if compressed is not None:
        variant_info["compressed"] = compressed
    if golden_inputs:
        variant_info["golden"] = golden_inputs

    now = datetime.now(UTC)
    try:
        with session.begin_nested():
            if model is None:
                model = Model(name=name, created_at=now)
                session.add(model)
                session.flush()
            if mv is None:
                mv = ModelVersion(model_id=model.id, version=version, created_at=now)
                session.add(mv)
                session.flush()
            if session.get(Artifact, sha) is None:
                session.add(Artifact(sha256=sha, size_bytes=size, kind="model", created_at=now))
            if compressed is not None and session.get(Artifact, compressed["sha256"]) is None:
                session.add(Artifact(sha256=compressed["sha256"],
                                     size_bytes=compressed["size_bytes"], kind=COMPRESSED_KIND,
                                     created_at=now))
            row = Variant(
                version_id=mv.id,
                name=variant,
                format=info.format,
                precision=precision,
                artifact_sha256=sha,
                info=variant_info,
                created_at=now,
            )
            session.add(row)
            session.flush()
    except IntegrityError as e:  # a concurrent add of the same thing won the race
        raise ConflictError(f"{name}:{version} variant {variant!r} already exists") from e
    return row


def _compressed_form(session: Session, blobs: BlobStore, model_sha256: str) -> dict[str, Any] | None:
    """The stored model's compressed form, as ``Variant.info["compressed"]`` records it:
    reused from a variant of the same file registered before, else built, round-tripped and
    stored as a blob. None when compression does not make the model smaller (the model then
    ships as it is)."""
    for other in session.scalars(select(Variant.info)
                                 .where(Variant.artifact_sha256 == model_sha256)):
        known = compressed_artifact(other)
        if (known is not None and blobs.has(known.sha256)
                and session.get(Artifact, known.sha256) is not None):
            return dict(other["compressed"])
    built = build_compressed_full(blobs.path(model_sha256), blobs.root,
                                  model_sha256=model_sha256)
    if built is None:
        return None
    try:
        was_stored = blobs.has(built.sha256)
        sha, size = blobs.put_file(built.path)
    finally:
        built.path.unlink(missing_ok=True)
    if not was_stored:
        session.info.setdefault(NEW_BLOBS_KEY, set()).add(sha)
    return {"codec": built.codec, "sha256": sha, "size_bytes": size, "level": built.level}


def backfill_compressed(session: Session, blobs: BlobStore,
                        model: str | None = None) -> list[tuple[Variant, dict[str, Any] | None]]:
    """Build the compressed form of every variant that has none (registered before full
    models shipped compressed); (variant, recorded form or None when compression does not
    shrink it) for each variant looked at. Idempotent."""
    query = select(Variant).order_by(Variant.id)
    if model is not None:
        query = (query.join(ModelVersion, ModelVersion.id == Variant.version_id)
                 .join(Model, Model.id == ModelVersion.model_id).where(Model.name == model))
    done: list[tuple[Variant, dict[str, Any] | None]] = []
    for variant in session.scalars(query).all():
        if compressed_artifact(variant.info) is not None:
            continue
        if not blobs.has(variant.artifact_sha256):
            raise NotFoundError(f"the model file of variant {variant.id} "
                                f"({variant.artifact_sha256[:12]}) is missing from the blob store")
        form = _compressed_form(session, blobs, variant.artifact_sha256)
        if form is not None:
            if session.get(Artifact, form["sha256"]) is None:
                session.add(Artifact(sha256=form["sha256"], size_bytes=form["size_bytes"],
                                     kind=COMPRESSED_KIND, created_at=datetime.now(UTC)))
            variant.info = {**(variant.info or {}), "compressed": form}  # a new dict: saved
            session.flush()
        done.append((variant, form))
    return done


def compressed_artifact(info: Mapping[str, Any] | None) -> FullArtifact | None:
    """The compressed form a variant's catalog info records, if any (variants registered
    before full models shipped compressed, and models compression does not shrink, have
    none: they ship as they are)."""
    entry = (info or {}).get("compressed")
    if not isinstance(entry, Mapping):
        return None
    codec, sha, size = entry.get("codec"), entry.get("sha256"), entry.get("size_bytes")
    if codec != ZSTD or not isinstance(sha, str) or not is_sha256(sha):
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        return None
    return FullArtifact(codec, sha, size)


def full_artifact(session: Session, model_sha256: str) -> FullArtifact | None:
    """What a full install of a registered model file ships; None for an unknown file."""
    size = session.scalar(select(Artifact.size_bytes).where(Artifact.sha256 == model_sha256))
    if size is None:
        return None
    for info in session.scalars(select(Variant.info)
                                .where(Variant.artifact_sha256 == model_sha256)):
        compressed = compressed_artifact(info)
        if compressed is not None:
            return resolve_full(model_sha256, size, compressed)
    return resolve_full(model_sha256, size)


def get_model(session: Session, name: str) -> Model:
    """A model with its versions and their variants loaded."""
    model = session.scalars(
        select(Model)
        .where(Model.name == name)
        .options(selectinload(Model.versions).selectinload(ModelVersion.variants))
    ).first()
    if model is None:
        raise NotFoundError(f"no model {name!r}")
    return model


def list_models(session: Session) -> list[Model]:
    """Every model (versions and variants loaded), by name."""
    return list(
        session.scalars(
            select(Model)
            .options(selectinload(Model.versions).selectinload(ModelVersion.variants))
            .order_by(Model.name)
        )
    )


def resolve_version(session: Session, spec: str) -> ModelVersion:
    """``NAME:VERSION``, or just ``VERSION`` when exactly one model is registered.

    The returned version has its model and variants loaded.
    """
    opts = (selectinload(ModelVersion.model), selectinload(ModelVersion.variants))
    if ":" in spec:
        name, _, version = spec.partition(":")
        if not name or not version:
            raise UsageError(f"invalid version {spec!r}: use NAME:VERSION")
        model = session.scalars(select(Model).where(Model.name == name)).first()
        if model is None:
            raise NotFoundError(f"no model {name!r}")
    else:
        version = spec
        n = session.scalar(select(func.count()).select_from(Model)) or 0
        if n != 1:
            raise UsageError(
                f"version {spec!r} is ambiguous: {n} models are registered; use NAME:VERSION"
            )
        model = session.scalars(select(Model)).one()
    mv = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.model_id == model.id, ModelVersion.version == version)
        .options(*opts)
    ).first()
    if mv is None:
        raise NotFoundError(f"model {model.name!r} has no version {version!r}")
    return mv


# --------------------------------------------------------------------------------- audit


def audit(
    session: Session,
    actor: str,
    action: str,
    subject: str,
    details: Mapping[str, Any] | None = None,
    *,
    at: datetime | None = None,
) -> AuditEntry:
    """Append one entry to the audit log (in the caller's transaction)."""
    entry = AuditEntry(
        at=at or datetime.now(UTC),
        actor=actor[:64],
        action=action[:64],
        subject=subject[:256],
        details=dict(details or {}),
    )
    session.add(entry)
    session.flush()
    return entry


def list_audit(session: Session, since: datetime | None = None) -> list[AuditEntry]:
    """Audit entries at or after ``since`` (all if None), oldest first."""
    q = select(AuditEntry).order_by(AuditEntry.at, AuditEntry.id)
    if since is not None:
        q = q.where(AuditEntry.at >= since)
    return list(session.scalars(q))


# ----------------------------------------------------------------------------- rendering


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


def variant_option(variant: Variant, size_bytes: int) -> VariantOption:
    """A variant as the planner wants it: its model file and compressed form."""
    info = variant.info or {}
    golden = info.get("golden")
    return VariantOption(variant.id, variant.name, variant.format, variant.precision,
                         variant.artifact_sha256, size_bytes, compressed_artifact(info),
                         io_signature=io_signature(info),
                         golden=tuple(golden) if isinstance(golden, list) else ())


def variant_options(session: Session, version_id: int) -> list[VariantOption]:
    """The deployable variants of a version, with their sizes, as the planner wants them."""
    return [
        variant_option(v, size)
        for v, size in session.execute(
            select(Variant, Artifact.size_bytes)
            .join(Artifact, Artifact.sha256 == Variant.artifact_sha256)
            .where(Variant.version_id == version_id)).all()
    ]


def best_delta(session: Session, base_sha256: str, target_sha256: str) -> Delta | None:
    """The smallest stored delta from ``base_sha256`` to ``target_sha256``, if any."""
    return session.scalar(select(Delta).where(Delta.base_sha256 == base_sha256,
                                              Delta.target_sha256 == target_sha256)
                          .order_by(Delta.size_bytes).limit(1))
