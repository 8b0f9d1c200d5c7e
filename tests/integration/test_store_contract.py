"""Storage contract: one suite, run against every backend (SQLite file and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select

from deltafleet.codecs import decode_sha256
from deltafleet.server import catalog, fleet
from deltafleet.server.audit import audit, list_audit
from deltafleet.server.errors import CatalogError, ConflictError, NotFoundError, UsageError
from deltafleet.server.planner import FullArtifact
from deltafleet.server.store import (
    BlobStore,
    Store,
    check_schema,
    current_revision,
    head_revision,
    upgrade,
)
from deltafleet.server.store.models import (
    Artifact,
    AuditEntry,
    Base,
    Device,
    DeviceModel,
)
from deltafleet.shared import Hello, ModelState, sha256_file
from tests.harness import modelgen

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/db/fleet.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def store(db_url: str):
    upgrade(db_url)
    s = Store(db_url)
    yield s
    s.dispose()


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("models")
    a = modelgen.make_onnx_model(d / "a.onnx", seed=1, size_mb=0.05)
    b = modelgen.make_onnx_model(d / "b.onnx", seed=2, size_mb=0.05)
    return Path(a), Path(b)


def hello(device_id: str = "dev-1", *, arch: str = "aarch64", labels: dict | None = None,
          models: tuple[ModelState, ...] = ()) -> Hello:
    return Hello(
        device_id=device_id,
        agent_version="0.1.0",
        profile={"arch": arch, "os": "linux", "cpu": "cortex-a78", "memory_bytes": 8 << 30,
                 "accelerator": "cuda", "runtimes": {"onnxruntime": "1.18.0"},
                 "disk_free_bytes": 20 << 30, "hardware_id": f"hw-{device_id}"},
        labels=labels if labels is not None else {"site": "berlin"},
        models=models,
    )


def counts(store: Store) -> dict[str, int]:
    with store.session() as s:
        return {
            t.name: s.scalar(select(func.count()).select_from(t)) or 0
            for t in Base.metadata.sorted_tables
        }


def blob_files(blobs: BlobStore) -> list[str]:
    if not blobs.root.exists():
        return []
    return sorted(str(p.relative_to(blobs.root)) for p in blobs.root.rglob("*") if p.is_file())


class TestSchema:
    def test_upgrade_creates_every_table_at_head(self, store: Store, db_url: str) -> None:
        tables = set(inspect(store.engine).get_table_names())
        assert set(Base.metadata.tables) | {"alembic_version"} == tables
        assert current_revision(db_url) == head_revision()
        check_schema(db_url)

    def test_upgrade_twice_is_a_no_op(self, store: Store, db_url: str) -> None:
        upgrade(db_url)
        assert current_revision(db_url) == head_revision()

    def test_unmigrated_database_is_refused_as_not_initialised(self, db_url: str) -> None:
        with pytest.raises(UsageError, match="not initialised; run `fleetctl init`"):
            check_schema(db_url)


class TestDevices:
    def test_hello_twice_updates_the_device_instead_of_duplicating(self, store: Store) -> None:
        with store.session() as s:
            fleet.upsert_devices_from_hellos(s, [hello(arch="x86_64")], T0)
        later = T0 + timedelta(minutes=5)
        with store.session() as s:
            fleet.upsert_devices_from_hellos(s, [hello(arch="aarch64", labels={"site": "paris"})], later
            )
        with store.session() as s:
            devices = s.scalars(select(Device)).all()
            assert [d.id for d in devices] == ["dev-1"]
            d = devices[0]
            assert (d.arch, d.labels, d.online) == ("aarch64", {"site": "paris"}, True)
            assert d.last_seen == later
            assert d.runtimes == {"onnxruntime": "1.18.0"}
            assert d.memory_bytes == 8 << 30 and d.hardware_id == "hw-dev-1"

    def test_hello_replaces_the_device_models(self, store: Store) -> None:
        first = (ModelState("det", "v1", SHA_A), ModelState("cls", "v1", SHA_B))
        with store.session() as s:
            fleet.upsert_devices_from_hellos(s, [hello(models=first)], T0)
        second = (ModelState("det", "v2", SHA_C, variant="int8"),)
        with store.session() as s:
            fleet.upsert_devices_from_hellos(s, [hello(models=second)], T0)
        with store.session() as s:
            rows = s.scalars(select(DeviceModel)).all()
            assert [(r.model_name, r.version, r.variant, r.sha256) for r in rows] == [
                ("det", "v2", "int8", SHA_C)
            ]

    def test_timestamps_read_back_timezone_aware(self, store: Store) -> None:
        with store.session() as s:
            fleet.upsert_devices_from_hellos(s, [hello()], T0)
        with store.session() as s:
            d = fleet.get_device(s, "dev-1")
            assert d.last_seen is not None and d.last_seen.tzinfo is not None
            assert d.last_seen == T0

    def test_status_marks_a_known_device_offline(self, store: Store) -> None:
        with store.session() as s:
            fleet.upsert_devices_from_hellos(s, [hello()], T0)
            fleet.set_device_online(s, "dev-1", False, T0 + timedelta(seconds=1))
        with store.session() as s:
            assert s.get(Device, "dev-1").online is False  # type: ignore[union-attr]

    def test_status_of_an_unknown_device_writes_nothing(self, store: Store) -> None:
        with store.session() as s:
            fleet.set_device_online(s, "ghost", True, T0)
        assert counts(store)["devices"] == 0

    def test_record_device_model_upserts_one_row_per_model(self, store: Store) -> None:
        with store.session() as s:
            fleet.upsert_devices_from_hellos(s, [hello()], T0)
            fleet.record_device_model(s, "dev-1", "det", "v1", "default", SHA_A, T0)
            fleet.record_device_model(s, "dev-1", "det", "v2", "default", SHA_B, T0)
            assert fleet.record_device_model(s, "ghost", "det", "v1", None, SHA_A, T0) is None
        with store.session() as s:
            rows = s.scalars(select(DeviceModel)).all()
            assert [(r.model_name, r.version, r.sha256) for r in rows] == [("det", "v2", SHA_B)]

    def test_unknown_device_is_not_found(self, store: Store) -> None:
        with store.session() as s, pytest.raises(NotFoundError):
            fleet.get_device(s, "ghost")


class TestGroups:
    def test_group_selects_devices_by_label(self, store: Store) -> None:
        with store.session() as s:
            fleet.upsert_devices_from_hellos(s, [hello("a", labels={"site": "berlin"})], T0)
            fleet.upsert_devices_from_hellos(s, [hello("b", labels={"site": "paris"})], T0)
            fleet.create_group(s, "berlin", {"site": "berlin"})
        with store.session() as s:
            assert [d.id for d in fleet.devices_in_group(s, "berlin")] == ["a"]

    def test_group_selects_devices_by_arch_and_label_together(self, store: Store) -> None:
        with store.session() as s:
            fleet.upsert_devices_from_hellos(s, [hello("a", arch="aarch64")], T0)
            fleet.upsert_devices_from_hellos(s, [hello("b", arch="x86_64")], T0)
            fleet.upsert_devices_from_hellos(s, [hello("c", arch="aarch64", labels={})], T0)
            fleet.create_group(s, "jetson", {"arch": "aarch64", "site": "berlin"})
        with store.session() as s:
            assert [d.id for d in fleet.devices_in_group(s, "jetson")] == ["a"]

    def test_empty_selector_matches_every_device(self, store: Store) -> None:
        with store.session() as s:
            fleet.upsert_devices_from_hellos(s, [hello("a")], T0)
            fleet.upsert_devices_from_hellos(s, [hello("b", labels={})], T0)
            fleet.create_group(s, "all", {})
        with store.session() as s:
            assert [d.id for d in fleet.devices_in_group(s, "all")] == ["a", "b"]

    def test_device_matches_requires_every_selector_entry(self, store: Store) -> None:
        with store.session() as s:
            [d] = fleet.upsert_devices_from_hellos(s, [hello(arch="aarch64")], T0)
            assert fleet.device_matches(d, {})
            assert fleet.device_matches(d, {"arch": "aarch64", "os": "linux"})
            assert not fleet.device_matches(d, {"arch": "aarch64", "site": "paris"})
            assert not fleet.device_matches(d, {"missing-label": "x"})

    def test_unknown_group_is_not_found(self, store: Store) -> None:
        with store.session() as s, pytest.raises(NotFoundError):
            fleet.devices_in_group(s, "nope")

    def test_duplicate_group_is_a_conflict(self, store: Store) -> None:
        with store.session() as s:
            fleet.create_group(s, "g", {"arch": "aarch64"})
        with store.session() as s, pytest.raises(ConflictError):
            fleet.create_group(s, "g", {"arch": "x86_64"})
        with store.session() as s:
            assert [g.selector for g in fleet.list_groups(s)] == [{"arch": "aarch64"}]


def add_versions(store: Store, blobs: BlobStore, *versions: tuple[str, str, Path]) -> None:
    """Register (name, version, file) versions in one session."""
    with store.session() as s:
        for name, version, path in versions:
            catalog.add_model_version(s, blobs, name, version, path)


class TestModels:
    def test_add_model_version_stores_blob_and_rows(
        self, store: Store, blobs: BlobStore, onnx_files: tuple[Path, Path]
    ) -> None:
        with store.session() as s:
            v = catalog.add_model_version(s, blobs, "det", "v1", onnx_files[0])
        assert blobs.has(v.artifact_sha256)
        assert blobs.path(v.artifact_sha256).read_bytes() == onnx_files[0].read_bytes()
        with store.session() as s:
            m = catalog.get_model(s, "det")
            assert [mv.version for mv in m.versions] == ["v1"]
            variant = m.versions[0].variants[0]
            assert (variant.name, variant.format, variant.precision) == ("default", "onnx", "fp32")
            assert variant.info["sha256"] == variant.artifact_sha256
            assert s.get(Artifact, variant.artifact_sha256).kind == "model"  # type: ignore[union-attr]

    def test_add_model_version_stores_the_compressed_form_full_installs_ship(
        self, store: Store, blobs: BlobStore, onnx_files: tuple[Path, Path]
    ) -> None:
        with store.session() as s:
            v = catalog.add_model_version(s, blobs, "det", "v1", onnx_files[0])
        packed = v.info["compressed"]
        assert packed["codec"] == "zstd" and packed["size_bytes"] < v.info["size_bytes"]
        assert sha256_file(blobs.path(packed["sha256"])) == packed["sha256"]
        assert decode_sha256("zstd", blobs.path(packed["sha256"]), None) == (
            v.artifact_sha256, v.info["size_bytes"])
        with store.session() as s:
            artifact = s.get(Artifact, packed["sha256"])
            assert artifact is not None
            assert (artifact.kind, artifact.size_bytes) == ("compressed", packed["size_bytes"])
            (option,) = catalog.variant_options(s, v.version_id)
            assert option.full == FullArtifact("zstd", packed["sha256"], packed["size_bytes"])

    def test_variants_registered_before_compression_are_backfilled_once(
        self, store: Store, blobs: BlobStore, onnx_files: tuple[Path, Path]
    ) -> None:
        with store.session() as s:
            v = catalog.add_model_version(s, blobs, "det", "v1", onnx_files[0])
            packed = v.info["compressed"]
            v.info = {k: x for k, x in v.info.items() if k != "compressed"}  # as registered before
        blobs.delete(packed["sha256"])
        with store.session() as s:
            s.delete(s.get(Artifact, packed["sha256"]))
        with store.session() as s:
            ((variant, form),) = catalog.backfill_compressed(s, blobs, "det")
            assert form == packed  # same frame, same blob address
        with store.session() as s:
            (option,) = catalog.variant_options(s, v.version_id)
            assert option.full == FullArtifact("zstd", packed["sha256"], packed["size_bytes"])
            assert s.get(Artifact, packed["sha256"]).kind == "compressed"  # type: ignore[union-attr]
            assert catalog.backfill_compressed(s, blobs) == []  # nothing left to do
        assert decode_sha256("zstd", blobs.path(packed["sha256"]), None) == (
            v.artifact_sha256, v.info["size_bytes"])

    def test_model_zstd_cannot_shrink_is_stored_without_a_compressed_form(
        self, store: Store, blobs: BlobStore, tmp_path: Path
    ) -> None:
        noise = modelgen.make_incompressible_onnx_model(tmp_path / "noise.onnx", size_mb=0.05)
        with store.session() as s:
            v = catalog.add_model_version(s, blobs, "det", "v1", noise)
        assert "compressed" not in v.info
        assert blob_files(blobs) == [f"{v.artifact_sha256[:2]}/{v.artifact_sha256}"]
        with store.session() as s:
            assert counts(store)["artifacts"] == 1
            (option,) = catalog.variant_options(s, v.version_id)
            assert option.full == FullArtifact("identity", v.artifact_sha256, noise.stat().st_size)

    def test_duplicate_version_is_a_conflict_and_writes_nothing(
        self, store: Store, blobs: BlobStore, onnx_files: tuple[Path, Path]
    ) -> None:
        with store.session() as s:
            catalog.add_model_version(s, blobs, "det", "v1", onnx_files[0])
        before, files = counts(store), blob_files(blobs)
        with pytest.raises(ConflictError), store.session() as s:
            catalog.add_model_version(s, blobs, "det", "v1", onnx_files[1])
        assert counts(store) == before
        assert blob_files(blobs) == files

    def test_second_variant_of_an_existing_version_is_allowed(
        self, store: Store, blobs: BlobStore, onnx_files: tuple[Path, Path]
    ) -> None:
        add_versions(store, blobs, ("det", "v1", onnx_files[0]))
        with store.session() as s:
            catalog.add_model_version(s, blobs, "det", "v1", onnx_files[1],
                                      variant="int8", precision="int8")
        with store.session() as s:
            versions = catalog.get_model(s, "det").versions
            assert len(versions) == 1
            assert sorted(v.name for v in versions[0].variants) == ["default", "int8"]

    def test_invalid_model_file_is_refused_before_anything_is_written(
        self, store: Store, blobs: BlobStore, tmp_path: Path
    ) -> None:
        junk = tmp_path / "junk.onnx"
        junk.write_bytes(b"not a model at all")
        with pytest.raises(CatalogError), store.session() as s:
            catalog.add_model_version(s, blobs, "det", "v1", junk)
        assert sum(counts(store).values()) == 0
        assert blob_files(blobs) == []

    @pytest.mark.parametrize(("name", "version"), [("Det", "v1"), ("det", "-v1"), ("", "v1"),
                                                   ("det", "v 1"), ("d" * 65, "v1")])
    def test_bad_name_or_version_is_a_usage_error(
        self, store: Store, blobs: BlobStore, onnx_files: tuple[Path, Path], name: str,
        version: str
    ) -> None:
        with pytest.raises(UsageError), store.session() as s:
            catalog.add_model_version(s, blobs, name, version, onnx_files[0])
        assert blob_files(blobs) == []

    def test_resolve_version_by_name_and_version(
        self, store: Store, blobs: BlobStore, onnx_files: tuple[Path, Path]
    ) -> None:
        add_versions(store, blobs, ("det", "v1", onnx_files[0]), ("det", "v2", onnx_files[1]))
        with store.session() as s:
            mv = catalog.resolve_version(s, "det:v2")
            assert (mv.model.name, mv.version) == ("det", "v2")
            assert catalog.resolve_version(s, "v1").version == "v1"

    def test_bare_version_is_ambiguous_with_two_models(
        self, store: Store, blobs: BlobStore, onnx_files: tuple[Path, Path]
    ) -> None:
        add_versions(store, blobs, ("det", "v1", onnx_files[0]), ("cls", "v1", onnx_files[1]))
        with store.session() as s:
            with pytest.raises(UsageError, match="NAME:VERSION"):
                catalog.resolve_version(s, "v1")
            assert catalog.resolve_version(s, "cls:v1").model.name == "cls"

    def test_unknown_model_or_version_is_not_found(
        self, store: Store, blobs: BlobStore, onnx_files: tuple[Path, Path]
    ) -> None:
        add_versions(store, blobs, ("det", "v1", onnx_files[0]))
        with store.session() as s:
            for spec in ("det:v9", "nope:v1", "v9"):
                with pytest.raises(NotFoundError):
                    catalog.resolve_version(s, spec)

    def test_same_file_in_two_versions_shares_one_artifact(
        self, store: Store, blobs: BlobStore, onnx_files: tuple[Path, Path]
    ) -> None:
        with store.session() as s:
            v1 = catalog.add_model_version(s, blobs, "det", "v1", onnx_files[0])
            v2 = catalog.add_model_version(s, blobs, "det", "v2", onnx_files[0])
            assert v1.info["compressed"] == v2.info["compressed"]
        c = counts(store)
        # the model and its compressed form, each stored once
        assert (c["artifacts"], c["variants"], c["model_versions"], c["models"]) == (2, 2, 2, 1)
        assert len(blob_files(blobs)) == 2


class TestAudit:
    def test_audit_lists_entries_since_a_time_oldest_first(self, store: Store) -> None:
        with store.session() as s:
            for i, minutes in enumerate((0, 10, 20)):
                audit(s, "alice", "model.add", f"det:v{i}", {"i": i},
                      at=T0 + timedelta(minutes=minutes))
        with store.session() as s:
            assert [e.subject for e in list_audit(s)] == ["det:v0", "det:v1", "det:v2"]
            recent = list_audit(s, T0 + timedelta(minutes=10))
            assert [(e.subject, e.details) for e in recent] == [
                ("det:v1", {"i": 1}), ("det:v2", {"i": 2})
            ]
            assert recent[0].at == T0 + timedelta(minutes=10)

    def test_since_in_another_timezone_compares_as_the_same_instant(self, store: Store) -> None:
        with store.session() as s:
            audit(s, "bob", "group.create", "g", {}, at=T0)
        berlin = timezone(timedelta(hours=1))
        with store.session() as s:
            assert len(list_audit(s, T0.astimezone(berlin))) == 1
            assert list_audit(s, (T0 + timedelta(seconds=1)).astimezone(berlin)) == []

    def test_failed_transaction_leaves_no_audit_entry(self, store: Store) -> None:
        with pytest.raises(RuntimeError), store.session() as s:
            audit(s, "bob", "group.create", "g", {})
            raise RuntimeError("boom")
        with store.session() as s:
            assert s.scalar(select(func.count()).select_from(AuditEntry)) == 0


@pytest.mark.postgres
def test_two_replicas_ingesting_hellos_of_the_same_new_devices_both_succeed(pg_url: str) -> None:
    """With $share/ subscriptions two replicas see hellos of one new device (a device says
    hello again whenever a server announces itself): overlapping batches, in opposite orders,
    at the same moment, must neither fail on duplicate keys nor deadlock."""
    import threading

    upgrade(pg_url)
    stores = [Store(pg_url), Store(pg_url)]
    ids = [f"race-{i:03d}" for i in range(60)]
    models = (ModelState("detector", "v1", "default", "a" * 64),)
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def ingest(store: Store, order: list[str]) -> None:
        try:
            start.wait()
            for _ in range(5):
                with store.session() as s:
                    fleet.upsert_devices_from_hellos(
                        s, [hello(i, models=models) for i in order], datetime.now(UTC))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=ingest, args=(stores[0], ids)),
               threading.Thread(target=ingest, args=(stores[1], ids[::-1]))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[0]
        with stores[0].session() as s:
            assert s.scalar(select(func.count()).select_from(Device)
                            .where(Device.id.in_(ids))) == len(ids)
            assert s.scalar(select(func.count()).select_from(DeviceModel)
                            .where(DeviceModel.device_id.in_(ids))) == len(ids)
    finally:
        for st in stores:
            st.dispose()
