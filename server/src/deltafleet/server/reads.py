"""The operator's reads in plain SQL: devices (list, by group), what each was asked to run,
rollouts (list, status with per-device rows).

One implementation, two ways to run it. ``fleetctl`` on the embedded SQLite default runs these
statements through the standard library's ``sqlite3`` (``SqliteReader``): no SQLAlchemy, no
ORM mapping, which are most of what a read costs to start (0.4-1 s on a 2-core machine, far
more than the queries while a rollout runs). The server, the API and PostgreSQL run the very
same statements through their SQLAlchemy ``Session`` (``SessionReader``). Either way a read is
one snapshot (SQLite WAL: a plain ``BEGIN``, so it never waits for, or holds, the write lock)
and writes nothing.

Values come back as each driver stores them (SQLite: text for times and JSON, 0/1 for
booleans); ``as_time``, ``as_json`` and ``as_bool`` turn both into what the ORM would give.
The JSON shapes are ``views``' and the CLI contract: ``rollout_json`` is ``fleetctl rollout
status --json`` and ``GET /rollouts/ID``, ``devices`` + ``views.device_to_json`` are
``fleetctl device list --json`` and ``GET /devices``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import NotFoundError, StoreError
from .phrases import clock, size_text
from .rollout.states import (
    ACTIVE_ROLLOUT_STATES,
    IN_FLIGHT_STATES,
    TERMINAL_STATES,
    TargetState,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = [
    "PROFILE_SELECTOR_KEYS",
    "Desired",
    "DeviceRow",
    "Reader",
    "SessionReader",
    "SqliteReader",
    "as_bool",
    "as_json",
    "as_time",
    "desired_for",
    "device_matches",
    "devices",
    "rollout_json",
    "rollouts_json",
    "migrations_dir",
    "sqlite_path",
]

SQLITE_BUSY_TIMEOUT_S = 30.0
PROFILE_SELECTOR_KEYS = ("arch", "os", "accelerator", "cpu")
_NOT_ASKED = frozenset({TargetState.REVERTED.value})  # the ask was withdrawn and undone
_IN_LIST_MAX = 500  # more ids than this: read every row and keep the wanted ones


class Record(dict[str, Any]):
    """One result row: its columns by name, also as attributes (``row.state``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Reader(Protocol):
    def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Record]:
        """Run one SELECT with ``:name`` parameters; every row."""


class SessionReader:
    """The statements through a SQLAlchemy session (its transaction, its connection)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Record]:
        from sqlalchemy import text  # noqa: PLC0415 - loaded already by whoever made the session

        result = self.session.execute(text(sql), dict(params or {}))
        keys = list(result.keys())
        return [Record(zip(keys, row, strict=True)) for row in result]


class SqliteReader:
    """The statements through ``sqlite3`` on one database file, in one read transaction
    (``with SqliteReader(path) as q``). ``PRAGMA query_only``: it cannot write."""

    def __init__(self, path: Path) -> None:
        try:
            self._conn = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S,
                                         isolation_level=None)
            self._conn.execute("PRAGMA query_only=ON")
            self._conn.execute("BEGIN")
        except sqlite3.Error as e:
            raise StoreError(f"database error: {e}") from None

    def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Record]:
        try:
            cur = self._conn.execute(sql, dict(params or {}))
            keys = [c[0] for c in cur.description]
            return [Record(zip(keys, row, strict=True)) for row in cur]
        except sqlite3.Error as e:
            raise StoreError(f"database error: {e}") from None

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("ROLLBACK")
        self._conn.close()

    def __enter__(self) -> SqliteReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def migrations_dir() -> Path:
    """The Alembic script directory: inside the installed wheel, else the repo checkout."""
    package_dir = Path(__file__).resolve().parent  # deltafleet/server
    for candidate in (package_dir / "migrations", package_dir.parents[3] / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StoreError(f"alembic migrations not found next to {package_dir}")


def sqlite_path(url: str) -> Path | None:
    """The file of a plain SQLite URL (``sqlite:///rel.db``, ``sqlite:////abs.db``), read the
    way SQLAlchemy reads it; None for anything else (PostgreSQL, memory, URI filenames, query
    options, escapes): those take the SQLAlchemy road."""
    for prefix in ("sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(prefix):
            rest = url[len(prefix):]
            if not rest or rest == ":memory:" or rest.startswith("file:") \
                    or any(c in rest for c in "?%#"):
                return None
            return Path(rest)
    return None


# -- values ---------------------------------------------------------------------------------
def as_time(value: Any) -> datetime | None:
    """A stored timestamp as an aware UTC datetime (SQLite keeps UTC wall-clock text)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def as_json(value: Any, default: Any = None) -> Any:
    """A JSON column's value (SQLite: its text; PostgreSQL's driver parses it already)."""
    if isinstance(value, str | bytes):
        value = json.loads(value)
    return default if value is None else value


def as_bool(value: Any) -> bool:
    return bool(value)


def _iso(value: Any) -> str | None:
    at = as_time(value)
    return None if at is None else at.isoformat()


# -- devices ----------------------------------------------------------------------------------
@dataclass(slots=True)
class ModelRow:
    """What a device reported it runs for one model (``store.models.DeviceModel``'s fields)."""

    model_name: str
    version: str | None
    variant: str | None
    sha256: str
    state: str | None
    updated_at: datetime | None


@dataclass(slots=True)
class DeviceRow:
    """A device as ``views.device_to_json`` and ``device_matches`` read it: the fields of
    ``store.models.Device``, with its models."""

    id: str
    hardware_id: str | None
    arch: str | None
    os: str | None
    cpu: str | None
    memory_bytes: int | None
    accelerator: str | None
    runtimes: dict[str, Any]
    disk_free_bytes: int | None
    labels: dict[str, Any]
    agent_version: str | None
    online: bool
    last_seen: datetime | None
    manifest_serial: int
    created_at: datetime | None
    models: list[ModelRow] = field(default_factory=list)


_DEVICE_COLUMNS = ("id, hardware_id, arch, os, cpu, memory_bytes, accelerator, runtimes, "
                   "disk_free_bytes, labels, agent_version, online, last_seen, manifest_serial, "
                   "created_at")


def devices(q: Reader, group: str | None = None) -> list[DeviceRow]:
    """Every device by id with its models, or those the named group's selector matches now
    (NotFoundError: no such group). Two statements whatever the fleet's size."""
    selector: Mapping[str, Any] = {}
    if group is not None:
        found = q.rows('SELECT selector FROM "groups" WHERE name = :name', {"name": group})
        if not found:
            raise NotFoundError(f"no group {group!r}")
        selector = as_json(found[0].selector, {})
    out: dict[str, DeviceRow] = {}
    for r in q.rows(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY id"):
        d = DeviceRow(
            id=r.id, hardware_id=r.hardware_id, arch=r.arch, os=r.os, cpu=r.cpu,
            memory_bytes=r.memory_bytes, accelerator=r.accelerator,
            runtimes=as_json(r.runtimes, {}), disk_free_bytes=r.disk_free_bytes,
            labels=as_json(r.labels, {}), agent_version=r.agent_version,
            online=as_bool(r.online), last_seen=as_time(r.last_seen),
            manifest_serial=r.manifest_serial or 0, created_at=as_time(r.created_at))
        if device_matches(d, selector):
            out[d.id] = d
    for m in q.rows("SELECT device_id, model_name, version, variant, sha256, state, updated_at "
                    "FROM device_models ORDER BY device_id, model_name"):
        owner = out.get(m.device_id)
        if owner is not None:
            owner.models.append(ModelRow(m.model_name, m.version, m.variant, m.sha256, m.state,
                                     as_time(m.updated_at)))
    return list(out.values())


def _selector_value(device: Any, key: str) -> str | None:
    profile = key in PROFILE_SELECTOR_KEYS
    value = getattr(device, key) if profile else (device.labels or {}).get(key)
    return None if value is None else str(value)


def device_matches(device: Any, selector: Mapping[str, Any]) -> bool:
    """True if, for every selector entry, the device's value is the entry's value (or one of
    its values, for a list); an empty selector matches all.

    Keys arch, os, accelerator and cpu name profile fields; any other key names a label.
    ``device``: a ``DeviceRow`` or a ``store.models.Device``.
    """
    for key, wanted in selector.items():
        value = _selector_value(device, key)
        options = wanted if isinstance(wanted, list) else [wanted]
        if value is None or value not in [str(x) for x in options]:
            return False
    return True


# -- what a device was asked to run ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Desired:
    """What a device was asked to run for one model and does not run (yet), or runs only in
    a trial: its latest rollout target. ``open`` is False once the rollout ended (aborted,
    rolled back, ...). ``waiting``: why an open target the device has not finished does not
    move now (``device offline since <time>``), else ""."""

    model: str
    version: str | None  # None: a rollback to a version the server never learnt the name of
    variant: str | None
    sha256: str | None
    rollout_id: int
    rollout_state: str
    state: str
    reason: str
    updated_at: datetime | None
    open: bool
    waiting: str = ""


def _in_list(column: str, ids: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """``WHERE column IN (:i0, :i1, ...)`` for a few ids; for many, no clause (the caller
    keeps the rows it wants)."""
    if len(ids) > _IN_LIST_MAX:
        return "", {}
    params = {f"i{n}": i for n, i in enumerate(ids)}
    return f"WHERE {column} IN ({', '.join(':' + k for k in params)}) ", params


def desired_for(q: Reader, devices: Sequence[Any]) -> dict[str, list[Desired]]:
    """Per device id: its latest rollout target per model, unless the device runs that target
    (its recorded sha256 is the target's, or the version when no artifact is chosen yet; in
    a trial only for the target of that trial) or the target was reverted. An open target of
    an offline device not in a final state says it waits for the device. ``devices``:
    ``DeviceRow``s or ORM devices with their models loaded. One statement."""
    out: dict[str, list[Desired]] = {d.id: [] for d in devices}
    if not out:
        return out
    where, params = _in_list("t.device_id", list(out))
    rows = q.rows(
        "SELECT t.device_id, t.rollout_id, t.state, t.reason, t.target_sha256, "
        "t.previous_version, t.previous_sha256, t.updated_at, r.state AS rollout_state, "
        "m.name AS model_name, v.version AS version, x.name AS variant "
        "FROM rollout_targets t JOIN rollouts r ON r.id = t.rollout_id "
        "JOIN models m ON m.id = r.model_id JOIN model_versions v ON v.id = r.version_id "
        "LEFT JOIN variants x ON x.id = t.variant_id "
        f"{where}ORDER BY t.device_id, m.name, r.id DESC", params)
    running = {(d.id, m.model_name): m for d in devices for m in d.models}
    away = {d.id: f"device offline since {clock(d.last_seen)}" for d in devices if not d.online}
    seen: set[tuple[str, str]] = set()
    for t in rows:
        key = (t.device_id, t.model_name)
        if key in seen or t.device_id not in out:
            continue
        seen.add(key)
        sha: str | None = t.target_sha256
        asked: str | None = t.version
        variant_name: str | None = t.variant
        if t.state == TargetState.REVERTING:  # asked to go back to what it ran before
            asked, sha, variant_name = t.previous_version, t.previous_sha256, None
        runs = running.get(key)
        proven = runs is not None and (runs.state != TargetState.TRIAL or t.state == TargetState.TRIAL)
        if t.state in _NOT_ASKED or (runs is not None and proven and (runs.sha256 == sha or (
                sha is None and asked is not None and runs.version == asked))):
            continue
        is_open = t.rollout_state in ACTIVE_ROLLOUT_STATES
        waiting = away.get(t.device_id, "") if is_open and t.state not in TERMINAL_STATES else ""
        out[t.device_id].append(Desired(
            model=t.model_name, version=asked, variant=variant_name, sha256=sha,
            rollout_id=t.rollout_id, rollout_state=t.rollout_state, state=t.state,
            reason=t.reason or "", updated_at=as_time(t.updated_at), open=is_open,
            waiting=waiting))
    return out


# -- rollouts ---------------------------------------------------------------------------------
_ROLLOUT = (
    "SELECT r.id, r.state, r.state_reason, r.current_wave, r.policy, r.created_by, "
    "r.created_at, r.finished_at, m.name AS model, v.version AS version, g.name AS group_name "
    "FROM rollouts r LEFT JOIN models m ON m.id = r.model_id "
    "LEFT JOIN model_versions v ON v.id = r.version_id "
    'LEFT JOIN "groups" g ON g.id = r.group_id ')


def rollouts_json(q: Reader, state: str | None = None) -> list[dict[str, Any]]:
    """Every rollout (of ``state``), newest first, as ``fleetctl rollout list --json`` prints
    them: ``rollout_json`` without targets."""
    where, params = ("WHERE r.state = :state ", {"state": state}) if state else ("", {})
    return [_rollout_out(q, r, with_targets=False)
            for r in q.rows(f"{_ROLLOUT}{where}ORDER BY r.id DESC", params)]


def rollout_json(q: Reader, rollout_id: int, *, with_targets: bool = True) -> dict[str, Any]:
    """A rollout as ``fleetctl rollout status --json`` prints it. Per target: ``bytes_sent`` is
    what the device reported fetching for the update over every attempt (0 when nothing yet,
    or it had the file), ``artifact_bytes`` the size of the artifact its manifest named,
    ``delivery`` why delta or full (the planner's reason at dispatch), ``rollback`` what a
    rollback sent (apart: the update's figures are kept). The rollout's ``bytes_sent`` /
    ``full_bytes`` compare what was sent with what full installs of the same devices would
    have been; ``rollback_bytes_sent`` is what rollbacks sent."""
    found = q.rows(f"{_ROLLOUT}WHERE r.id = :id", {"id": rollout_id})
    if not found:
        raise NotFoundError(f"unknown rollout {rollout_id} (see `fleetctl rollout list`)")
    return _rollout_out(q, found[0], with_targets=with_targets)


def _rollout_out(q: Reader, r: Record, *, with_targets: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": r.id, "model": r.model, "version": r.version, "group": r.group_name,
        "state": r.state, "state_reason": r.state_reason, "current_wave": r.current_wave,
        "policy": as_json(r.policy), "created_by": r.created_by,
        "created_at": _iso(r.created_at), "finished_at": _iso(r.finished_at),
        **_rollout_figures(q, r.id),
    }
    if with_targets:
        out["targets"] = _target_rows(q, r.id, r.current_wave, r.model or "")
    return out


def _rollout_figures(q: Reader, rollout_id: int) -> dict[str, Any]:
    """Counts by state, bytes and agreement per wave from aggregates and two columns, not
    from loading every target: `rollout list` costs the same at 10 or 10,000 devices."""
    mine = {"id": rollout_id}
    counts = {r.state: int(r.n) for r in q.rows(
        "SELECT state, COUNT(*) AS n FROM rollout_targets WHERE rollout_id = :id "
        "GROUP BY state ORDER BY state", mine)}
    (sums,) = q.rows(
        "SELECT COALESCE(SUM(bytes_sent), 0) AS sent, "
        "COALESCE(SUM(CASE WHEN bytes_sent IS NOT NULL THEN COALESCE(full_bytes, 0) ELSE 0 END),"
        " 0) AS full_sent, COALESCE(SUM(bytes_to_send), 0) AS planned, "
        "COALESCE(SUM(rollback_bytes_sent), 0) AS rollback_sent "
        "FROM rollout_targets WHERE rollout_id = :id", mine)
    agreement: dict[int, list[int]] = {}
    for t in q.rows("SELECT wave, health FROM rollout_targets WHERE rollout_id = :id", mine):
        agreed = (as_json(t.health) or {}).get("agreement_ppm")
        if isinstance(agreed, int) and not isinstance(agreed, bool):
            agreement.setdefault(t.wave, []).append(agreed)
    return {"counts": counts, "bytes_sent": int(sums.sent), "full_bytes": int(sums.full_sent),
            "planned_bytes": int(sums.planned), "rollback_bytes_sent": int(sums.rollback_sent),
            "agreement": [_wave_agreement(w, v) for w, v in sorted(agreement.items())]}


def _target_rows(q: Reader, rollout_id: int, current_wave: int,
                 model_name: str) -> list[dict[str, Any]]:
    """One dict per target, by device id (columns, not ORM objects: 10,000 targets build
    10,000 dicts and nothing else)."""
    rows = q.rows(
        "SELECT t.device_id, t.wave, t.attempts, t.state, t.reason, t.artifact_kind, "
        "t.bytes_to_send, t.bytes_sent, t.full_bytes, t.delivery, t.rollback_bytes, "
        "t.rollback_bytes_sent, t.target_sha256, t.previous_version, t.health, t.updated_at, "
        "x.name AS variant_name, dm.sha256 AS running_sha256, d.online AS online, "
        "d.last_seen AS last_seen "
        "FROM rollout_targets t LEFT JOIN variants x ON x.id = t.variant_id "
        "LEFT JOIN device_models dm ON dm.device_id = t.device_id "
        "AND dm.model_name = :model "
        "LEFT JOIN devices d ON d.id = t.device_id "
        "WHERE t.rollout_id = :id ORDER BY t.device_id", {"id": rollout_id, "model": model_name})
    targets = []
    for t in rows:
        online, last_seen = as_bool(t.online), as_time(t.last_seen)
        rollback = None
        if t.rollback_bytes is not None:
            rollback = {"artifact_bytes": t.rollback_bytes, "bytes_sent": t.rollback_bytes_sent,
                        "note": rollback_note(t)}
        targets.append({
            "device": t.device_id, "wave": t.wave, "attempts": t.attempts,
            "state": t.state, "reason": shown_reason(t, online, last_seen, current_wave),
            "online": online,
            "offline_since": None if online or last_seen is None else last_seen.isoformat(),
            "variant": t.variant_name, "artifact": t.artifact_kind,
            "artifact_bytes": t.bytes_to_send, "bytes_sent": t.bytes_sent or 0,
            "full_bytes": t.full_bytes, "delivery": t.delivery or "", "rollback": rollback,
            "target_sha256": t.target_sha256, "running_sha256": t.running_sha256,
            "previous_version": t.previous_version, "health": as_json(t.health),
            "updated_at": _iso(t.updated_at),
        })
    return targets


def shown_reason(t: Any, online: bool, last_seen: datetime | None, current_wave: int) -> str:
    """The target's reason, saying what a pending target waits for (its wave to open, its
    device to come back: nothing is dispatched to an offline device) and when an in-flight
    target's device is offline (its manifest waits at the broker)."""
    later = t.state == TargetState.PENDING and t.wave > current_wave
    if t.state in TERMINAL_STATES or (online and not later):
        return str(t.reason)
    if online:
        why = f"waiting for wave {t.wave + 1} to open"
    else:
        away = f"offline since {clock(last_seen)}"
        if later:
            why = f"waiting for wave {t.wave + 1} to open; {away}"
        elif t.state == TargetState.PENDING:
            why = f"waiting: {away}; the update is sent when it reconnects"
        elif t.state in IN_FLIGHT_STATES:
            why = f"waiting: {away}; the manifest waits for it at the broker"
        else:
            why = f"waiting: {away}"
    return f"{why} ({t.reason})" if t.reason else why


def _wave_agreement(wave: int, ppm: Iterable[int]) -> dict[str, Any]:
    """Output agreement with the previous version in one wave, from its devices' trial
    reports (``agreement_ppm``: shadowed live requests and golden inputs; docs/agent.md)."""
    ordered = sorted(ppm)
    return {"wave": wave, "devices": len(ordered), "min_ppm": ordered[0],
            "median_ppm": ordered[len(ordered) // 2], "max_ppm": ordered[-1]}


def rollback_note(t: Any) -> str:
    """What the rollback of this device sent, in words."""
    back_to = t.previous_version or "the previous version"
    if t.rollback_bytes_sent is None:
        return f"rollback to {back_to}: nothing reported yet"
    if t.rollback_bytes_sent == 0:
        return f"rollback to {back_to}: 0 B sent, the file was still on the device"
    return f"rollback to {back_to}: {size_text(t.rollback_bytes_sent)} sent"

