"""ORM schema (SQLAlchemy 2.0 typed). Alembic migrations are the only thing that creates it.

Tables: devices, device_models, groups, models, model_versions, variants, artifacts, deltas,
rollouts, rollout_targets, rollout_counts, rollout_events, device_telemetry,
device_telemetry_models, audit_log, api_tokens, device_portraits, device_benchmarks,
bench_requests (docs/portraits.md).

``rollout_counts`` holds, per rollout, wave and state, how many targets are in it. It is kept
by one flush hook (``count_target_moves``) in the same transaction as every insert, move or
delete of a ``RolloutTarget`` made through the ORM, so it always equals a recount (a bulk
``update(RolloutTarget)`` of ``state`` or ``wave`` would bypass it: there is none, keep it so).
The same hook appends each target's state move to ``rollout_events`` (what the live rollout
stream sends, by id), and drops a rollout's events ``ROLLOUT_EVENTS_KEPT_DAYS`` after it ended.

Rollout and rollout target (per device) states, and the moves between them, are the tables
at the top of ``deltafleet.server.rollout.states``; the columns hold their string values.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
    func,
    inspect,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from ..rollout.states import FINAL_ROLLOUT_STATES, RolloutState, TargetState

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SHA = String(64)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    SQLite has no timezone type: SQLAlchemy stores the wall clock and reads back a naive value.
    This type converts to UTC before storing and marks values read back as UTC, so code can
    compare timestamps without caring which database it runs on. Naive input is taken as UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    hardware_id: Mapped[str | None] = mapped_column(String(128))
    arch: Mapped[str | None] = mapped_column(String(32))
    os: Mapped[str | None] = mapped_column(String(64))
    cpu: Mapped[str | None] = mapped_column(String(128))
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    accelerator: Mapped[str | None] = mapped_column(String(64))
    runtimes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # name -> version
    disk_free_bytes: Mapped[int | None] = mapped_column(BigInteger)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # str -> str
    agent_version: Mapped[str | None] = mapped_column(String(32))
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)  # see sql
    manifest_serial: Mapped[int] = mapped_column(BigInteger, default=0)  # last serial signed
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    models: Mapped[list[DeviceModel]] = relationship(
        back_populates="device", lazy="raise", cascade="all, delete-orphan"
    )


class DeviceModel(Base):
    """What model (by sha256) a device reports it runs, one row per model name."""

    __tablename__ = "device_models"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    model_name: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str | None] = mapped_column(String(64))
    variant: Mapped[str | None] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(SHA)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # "trial" while the last report for this model was a trial (runs, not proven yet);
    # None once committed, rolled back or reported settled (migration 0007)
    state: Mapped[str | None] = mapped_column(String(16), nullable=True)

    device: Mapped[Device] = relationship(back_populates="models", lazy="raise")


class Group(Base):
    """A device group: ``selector`` maps label names or profile fields (arch, os, accelerator)
    to the value a device must have. An empty selector matches every device."""

    __tablename__ = "groups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    selector: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    versions: Mapped[list[ModelVersion]] = relationship(back_populates="model", lazy="raise")


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    model: Mapped[Model] = relationship(back_populates="versions", lazy="raise")
    variants: Mapped[list[Variant]] = relationship(back_populates="version", lazy="raise")


class Artifact(Base):
    """A content-addressed blob on disk (``$FLEET_HOME/blobs/<sha[:2]>/<sha>``)."""

    __tablename__ = "artifacts"

    sha256: Mapped[str] = mapped_column(SHA, primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))  # "model" | "delta" | "compressed" (a model's)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Variant(Base):
    """One deployable file of a model version: a format and precision for some devices."""

    __tablename__ = "variants"
    __table_args__ = (UniqueConstraint("version_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    name: Mapped[str] = mapped_column(String(64), default="default")
    format: Mapped[str] = mapped_column(String(16))  # "onnx" | "tflite"
    precision: Mapped[str] = mapped_column(String(8), default="fp32")  # fp32 | fp16 | int8
    artifact_sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"))
    # catalog metadata; "compressed": {"codec", "sha256", "size_bytes", "level"} names the
    # artifact a full install ships when it is smaller than the model (none: the model itself)
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    version: Mapped[ModelVersion] = relationship(back_populates="variants", lazy="raise")


class Delta(Base):
    """A cached binary delta from ``base_sha256`` to ``target_sha256``."""

    __tablename__ = "deltas"
    __table_args__ = (UniqueConstraint("base_sha256", "target_sha256", "codec"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_sha256: Mapped[str] = mapped_column(SHA)
    target_sha256: Mapped[str] = mapped_column(SHA)
    codec: Mapped[str] = mapped_column(String(16))
    artifact_sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    build_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Rollout(Base):
    """A rollout of one model version to one group; its states: ``rollout.states``."""

    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    group_id: Mapped[int] = mapped_column(ForeignKey("groups.id"))
    state: Mapped[str] = mapped_column(String(16), default=RolloutState.RUNNING.value)
    state_reason: Mapped[str] = mapped_column(Text, default="")
    policy: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # RolloutPolicy.to_json()
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    failures_acknowledged: Mapped[int] = mapped_column(Integer, default=0)  # by `resume`
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    targets: Mapped[list[RolloutTarget]] = relationship(back_populates="rollout", lazy="raise")


class RolloutTarget(Base):
    __tablename__ = "rollout_targets"
    __table_args__ = (
        UniqueConstraint("rollout_id", "device_id"),
        # what a tick asks: pending targets of the open waves, deadlines and holds that are due
        Index("ix_rollout_targets_pending", "rollout_id", "state", "wave", "device_id"),
        Index("ix_rollout_targets_deadline", "rollout_id", "state", "state_deadline"),
        Index("ix_rollout_targets_hold", "rollout_id", "state", "hold_until"),
        # a device's open targets (its events and hellos)
        Index("ix_rollout_targets_device", "device_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    variant_id: Mapped[int | None] = mapped_column(ForeignKey("variants.id"))
    state: Mapped[str] = mapped_column(String(16), default=TargetState.PENDING.value)
    reason: Mapped[str] = mapped_column(Text, default="")
    base_sha256: Mapped[str | None] = mapped_column(SHA)
    target_sha256: Mapped[str | None] = mapped_column(SHA)
    artifact_sha256: Mapped[str | None] = mapped_column(SHA)
    artifact_kind: Mapped[str | None] = mapped_column(String(8))  # "full" | "delta"
    bytes_to_send: Mapped[int | None] = mapped_column(BigInteger)  # the update artifact's size
    full_bytes: Mapped[int | None] = mapped_column(BigInteger)  # the target model file's size
    # what the device reported fetching for the update (0: it had the file), every attempt
    bytes_sent: Mapped[int | None] = mapped_column(BigInteger)
    delivery: Mapped[str] = mapped_column(Text, default="")  # why delta or full (planner)
    rollback_bytes: Mapped[int | None] = mapped_column(BigInteger)  # the rollback artifact's
    rollback_bytes_sent: Mapped[int | None] = mapped_column(BigInteger)  # fetched to roll back
    manifest_id: Mapped[str | None] = mapped_column(String(32))
    serial: Mapped[int | None] = mapped_column(BigInteger)
    manifest: Mapped[str | None] = mapped_column(Text)  # signed envelope, re-sent on hello
    wave: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    hold_until: Mapped[datetime | None] = mapped_column(UTCDateTime)  # held out after failures
    state_deadline: Mapped[datetime | None] = mapped_column(UTCDateTime)  # timeout of the state
    previous_sha256: Mapped[str | None] = mapped_column(SHA)  # what the device ran before
    previous_version: Mapped[str | None] = mapped_column(String(64))
    health: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # trial figures
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    rollout: Mapped[Rollout] = relationship(back_populates="targets", lazy="raise")


class RolloutCount(Base):
    """How many targets of a rollout's wave are in a state (see ``count_target_moves``)."""

    __tablename__ = "rollout_counts"

    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    wave: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    n: Mapped[int] = mapped_column(Integer, default=0)


ROLLOUT_EVENTS_KEPT_DAYS = 7


class RolloutEvent(Base):
    """One target's state move (``from_state`` None: the target was created), appended by
    ``count_target_moves`` in the transaction that made it; ``id`` orders them (the stream's
    event id: a client resumes after the last one it saw)."""

    __tablename__ = "rollout_events"
    __table_args__ = (Index("ix_rollout_events_rollout_id", "rollout_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(Integer)
    device_id: Mapped[str] = mapped_column(String(64))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DeviceEvent(Base):
    """Events already applied, by the id the agent gave them: agents deliver at least once
    (on-disk outbox), the server applies each event once, across restarts and replicas."""

    __tablename__ = "device_events"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


# Latency buckets of device telemetry: one column per bucket of
# ``shared.messages.TELEMETRY_LATENCY_BOUNDS_US`` plus +Inf (counts per bucket, not cumulative)
TELEMETRY_BUCKETS = 13


class DeviceTelemetry(Base):
    """The latest telemetry summary of a device (``server.telemetry``): its memory, when it
    came, and the raw cumulative counters of that agent boot (``last``: the deltas of the next
    summary are taken against them)."""

    __tablename__ = "device_telemetry"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    boot_id: Mapped[str] = mapped_column(String(32))
    seq: Mapped[int] = mapped_column(BigInteger)
    device_type: Mapped[str] = mapped_column(String(64))
    rss_bytes: Mapped[int] = mapped_column(BigInteger)
    uptime_s: Mapped[int] = mapped_column(BigInteger)
    sent_at: Mapped[int] = mapped_column(BigInteger)  # device clock, unix s
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # "model\nversion" -> counters


class DeviceTelemetryModel(Base):
    """Per device, model and version: inference totals summed over the agent's boots (so the
    fleet sums the scrape takes only ever grow), with the variant and device type they ran on."""

    __tablename__ = "device_telemetry_models"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    variant: Mapped[str] = mapped_column(String(64), default="")
    device_type: Mapped[str] = mapped_column(String(64), default="")
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    fallbacks: Mapped[int] = mapped_column(BigInteger, default=0)
    swaps: Mapped[int] = mapped_column(BigInteger, default=0)
    trials_passed: Mapped[int] = mapped_column(BigInteger, default=0)
    trials_failed: Mapped[int] = mapped_column(BigInteger, default=0)
    agreement_ppm_sum: Mapped[int] = mapped_column(BigInteger, default=0)
    agreement_trials: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_sum_us: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_0: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_1: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_2: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_3: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_4: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_5: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_6: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_7: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_8: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_9: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_10: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_11: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_12: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DevicePortrait(Base):
    """What a device can actually use (its last ``Portrait``, checked by ``guard.check_portrait``)
    and its device type, the key of the baseline library (``selection.device_type_of``)."""

    __tablename__ = "device_portraits"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    device_type: Mapped[str] = mapped_column(String(64), index=True)
    portrait: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DeviceBenchmark(Base):
    """A device's latest benchmark of one model file (by sha256); ``device_type`` is copied
    from its portrait when the result arrives, so baselines group without a join."""

    __tablename__ = "device_benchmarks"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    sha256: Mapped[str] = mapped_column(SHA, primary_key=True)
    device_type: Mapped[str] = mapped_column(String(64), index=True)
    variant: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(64))
    runtime: Mapped[str] = mapped_column(String(64))
    runtime_version: Mapped[str] = mapped_column(String(64))
    load_ms: Mapped[int | None] = mapped_column(BigInteger)
    p50_us: Mapped[int | None] = mapped_column(BigInteger)
    p95_us: Mapped[int | None] = mapped_column(BigInteger)
    peak_rss_bytes: Mapped[int | None] = mapped_column(BigInteger)
    model_rss_bytes: Mapped[int | None] = mapped_column(BigInteger)
    energy_uj: Mapped[int | None] = mapped_column(BigInteger)  # per inference
    runs: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    measured_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class BenchRequestRow(Base):
    """A signed benchmark request for one device; the server publishes it retained on the
    device's ``benchreq`` topic (``published_at``) and clears it once every result is in."""

    __tablename__ = "bench_requests"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    envelope: Mapped[str] = mapped_column(Text)  # the signed request as published
    variants: Mapped[list[Any]] = mapped_column(JSON, default=list)  # sha256s asked
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(256))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ApiToken(Base):
    """A management API token (``api.tokens``): only the sha256 of the secret is kept; a
    revoked token stays listed (``revoked_at``) and is refused at once."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(48), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # viewer | operator | admin
    token_sha256: Mapped[str] = mapped_column(SHA, unique=True)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


def _old_value(session: Session, target: RolloutTarget, name: str) -> Any:
    history = getattr(inspect(target).attrs, name).history
    if history.deleted:
        return history.deleted[0]
    if history.unchanged:
        return history.unchanged[0]
    column = getattr(RolloutTarget, name)  # set without being loaded: ask the row
    return session.connection().execute(
        select(column).where(RolloutTarget.id == target.id)).scalar_one()


@event.listens_for(Session, "before_flush")
def count_target_moves(session: Session, _context: Any, _instances: Any) -> None:
    """Add every target move of this flush to ``rollout_counts`` (one upsert per flush) and
    each state move to ``rollout_events`` (one insert per flush)."""
    if session.info.get("read_only") and (session.new or session.dirty or session.deleted):
        # a caller's bug, not bad input: stays builtin (test_error_root)
        raise RuntimeError("a read-only session was asked to write")
    delta: dict[tuple[int, int, str], int] = {}
    moves: list[dict[str, Any]] = []

    def moved(t: RolloutTarget, old: str | None, new: str) -> None:
        if old != new:
            moves.append({"rollout_id": t.rollout_id, "device_id": t.device_id,
                          "from_state": old, "to_state": str(new), "reason": t.reason or "",
                          "at": t.updated_at or utcnow()})

    def add(rollout_id: int, wave: int, state: str, n: int) -> None:
        key = (rollout_id, wave, str(state))
        delta[key] = delta.get(key, 0) + n

    for obj in session.new:
        if isinstance(obj, RolloutTarget):
            if obj.rollout_id is None:
                # a caller's bug, not bad input: stays builtin (test_error_root)
                raise RuntimeError("a rollout target is flushed without its rollout_id")
            state = obj.state if obj.state is not None else TargetState.PENDING.value
            add(obj.rollout_id, obj.wave or 0, state, 1)
            moved(obj, None, state)
    for obj in session.dirty:
        if not isinstance(obj, RolloutTarget) or inspect(obj).persistent is False:
            continue
        attrs = inspect(obj).attrs
        if not (attrs.state.history.has_changes() or attrs.wave.history.has_changes()
                or attrs.rollout_id.history.has_changes()):
            continue
        old_state = _old_value(session, obj, "state")
        add(_old_value(session, obj, "rollout_id"), _old_value(session, obj, "wave"),
            old_state, -1)
        add(obj.rollout_id, obj.wave, obj.state, 1)
        moved(obj, old_state, obj.state)
    for obj in session.deleted:
        if isinstance(obj, RolloutTarget):
            add(_old_value(session, obj, "rollout_id"), _old_value(session, obj, "wave"),
                _old_value(session, obj, "state"), -1)
    _record_moves(session, moves)
    rows = [{"rollout_id": r, "wave": w, "state": st, "n": n}
            for (r, w, st), n in sorted(delta.items()) if n]
    if not rows:
        return
    conn = session.connection()
    table = cast(Table, RolloutCount.__table__)
    # the dialects' inserts are imported here: loading both dialect packages costs ~50 ms of
    # every fleetctl start, and only writes that touch the counters need one
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt: Any = pg_insert(table)
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(table)
    conn.execute(stmt.on_conflict_do_update(
        index_elements=[table.c.rollout_id, table.c.wave, table.c.state],
        set_={"n": table.c.n + stmt.excluded.n}), rows)


def _record_moves(session: Session, moves: list[dict[str, Any]]) -> None:
    """Append ``moves`` to ``rollout_events``; when a rollout of this flush ends, drop the
    events of rollouts that ended more than ``ROLLOUT_EVENTS_KEPT_DAYS`` ago."""
    conn = None
    if moves:
        conn = session.connection()
        conn.execute(cast(Table, RolloutEvent.__table__).insert(), moves)
    ended = any(isinstance(obj, Rollout) and obj.state in FINAL_ROLLOUT_STATES
                and inspect(obj).attrs.state.history.has_changes() for obj in session.dirty)
    if ended:
        conn = conn or session.connection()
        old = select(Rollout.id).where(
            Rollout.finished_at < utcnow() - timedelta(days=ROLLOUT_EVENTS_KEPT_DAYS))
        events = cast(Table, RolloutEvent.__table__)
        conn.execute(events.delete().where(events.c.rollout_id.in_(old)))


def recount(session: Session, rollout_id: int) -> dict[tuple[int, str], int]:
    """Targets per (wave, state) of a rollout, counted from the targets themselves."""
    return {(w, st): n for w, st, n in session.execute(
        select(RolloutTarget.wave, RolloutTarget.state, func.count())
        .where(RolloutTarget.rollout_id == rollout_id)
        .group_by(RolloutTarget.wave, RolloutTarget.state)).all()}


def counts(session: Session, rollout_id: int) -> dict[tuple[int, str], int]:
    """Targets per (wave, state) of a rollout, as the counters say (zeros left out)."""
    return {(w, st): n for w, st, n in session.execute(
        select(RolloutCount.wave, RolloutCount.state, RolloutCount.n)
        .where(RolloutCount.rollout_id == rollout_id, RolloutCount.n != 0)).all()}
