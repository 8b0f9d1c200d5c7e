"""Automatic benchmark requests (``bench_requests.auto_requests``) on a real store (SQLite and
PostgreSQL): which device types are asked, by which device, for which variants, and what is
never asked again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text

from deltafleet.server import bench_requests as br
from deltafleet.server.catalog import variant_options
from deltafleet.server.config import ServerConfig
from deltafleet.server.errors import UsageError
from deltafleet.server.fleet import portraits as fp
from deltafleet.server.fleet import set_devices_presence, upsert_devices_from_hellos
from deltafleet.server.store import Store, upgrade
from deltafleet.server.store.models import (
    Artifact,
    AuditEntry,
    BenchRequestRow,
    Model,
    ModelVersion,
    Variant,
)
from deltafleet.shared import Hello
from deltafleet.shared.messages import BenchResult, Portrait

NOW = datetime(2026, 12, 2, 12, tzinfo=UTC)
MiB = 1 << 20


@pytest.fixture
def store(empty_store: Store) -> Store:
    return empty_store


def sha(tag: str) -> str:
    return (tag * 64)[:64]


def add_version(s, model: str, version: str, variants: list[tuple[str, str, dict]],
                at: datetime = NOW - timedelta(minutes=5)) -> dict[str, str]:
    """Register a version's variants (name, format, info) as rows; returns name -> sha256."""
    m = s.scalar(select(Model).where(Model.name == model))
    if m is None:
        m = Model(name=model, created_at=at)
        s.add(m)
        s.flush()
    mv = ModelVersion(model_id=m.id, version=version, created_at=at)
    s.add(mv)
    s.flush()
    out = {}
    for name, fmt, info in variants:
        digest = sha(f"{model}{version}{name}".encode().hex())
        s.add(Artifact(sha256=digest, size_bytes=2 * MiB, kind="model", created_at=at))
        s.flush()
        s.add(Variant(version_id=mv.id, name=name, format=fmt, artifact_sha256=digest,
                      precision="int8" if "int8" in name else "fp32", info=info, created_at=at))
        out[name] = digest
    s.flush()
    return out


def add_devices(s, device_type: str, ids: list[str], *, online: bool = True,
                seen: datetime = NOW, portrait: dict | None = None) -> None:
    """Devices of one type that said hello at ``seen`` (later ids: later) and sent a portrait."""
    for i, device_id in enumerate(ids):
        upsert_devices_from_hellos(s, [Hello(
            device_id, "1.0", {"arch": "x86_64", "cpu": "i5", "memory_bytes": 8 << 30,
                               "runtimes": {"onnxruntime": "1.20.1"}},
            {"device-type": device_type}, ())], seen + timedelta(seconds=i))
    fp.record_portraits(s, [Portrait(d, portrait or {
        "accelerators": ["cpu"], "memory": {"available_bytes": 4 << 30},
        "disk": {"free_bytes": 10 << 30}}) for d in ids], seen)
    if not online:
        set_devices_presence(s, dict.fromkeys(ids, False), seen)


def requests(s) -> dict[str, BenchRequestRow]:
    return {r.id: r for r in s.scalars(select(BenchRequestRow))}


def named(row: BenchRequestRow) -> list[str]:
    return [v["name"] for v in row.variants[1:]]


def test_a_new_version_asks_one_device_per_type_for_every_variant_once(store: Store) -> None:
    with store.session() as s:
        add_version(s, "detector", "v1", [("default", "onnx", {})],
                    at=NOW - timedelta(days=2))
        v2 = add_version(s, "detector", "v2", [("default", "onnx", {}), ("int8", "onnx", {})])
        add_devices(s, "edge-box", ["e1", "e3", "e2"])  # e2 said hello last
        ids = br.auto_requests(s, NOW)
    with store.read() as s:
        (row,) = requests(s).values()
        assert ids == [row.id] and row.id.startswith(fp.AUTO_REQUEST_PREFIX)
        assert row.device_id == "e2"  # the type's device seen most recently
        assert named(row) == ["default", "int8"]  # only the newest version's variants
        assert {v["sha256"] for v in row.variants[1:]} == set(v2.values())
        assert row.variants[0] == {"runs": br.AUTO_RUNS, "warmup": br.AUTO_WARMUP} == {
            "runs": 20, "warmup": 3}
        (entry,) = s.scalars(select(AuditEntry))
        assert (entry.actor, entry.action, entry.subject) == (
            "server", "profile.bench.auto", "detector:v2")
        assert entry.details["requests"][0]["variants"] == ["detector:v2/default",
                                                            "detector:v2/int8"]
    with store.session() as s:  # asked once: never again, done or not
        assert br.auto_requests(s, NOW + timedelta(minutes=1)) == []
        s.get(BenchRequestRow, ids[0]).done_at = NOW + timedelta(hours=1)  # expired unanswered
        s.flush()
        assert br.auto_requests(s, NOW + timedelta(hours=2)) == []
    with store.read() as s:
        assert len(requests(s)) == 1
        assert len(list(s.scalars(select(AuditEntry)))) == 1  # no sweep without requests audited


def test_a_type_that_measured_a_variant_is_not_asked_for_it(store: Store) -> None:
    with store.session() as s:
        v1 = add_version(s, "detector", "v1", [("default", "onnx", {}), ("int8", "onnx", {})])
        add_devices(s, "edge-box", ["e1", "e2"])
        add_devices(s, "pi", ["p1"])
        # another device of the type measured default (its figures came from any request);
        # pi measured both, int8 with an error: an error counts as measured too
        fp.record_bench_results(s, [
            BenchResult("r-1", "e1", "manual", "default", v1["default"], "onnxruntime",
                        "1.20.1", {"p50_us": 10, "p95_us": 20, "runs": 5}),
            BenchResult("r-2", "p1", "manual", "default", v1["default"], "onnxruntime",
                        "1.20.1", {"p50_us": 10, "p95_us": 20, "runs": 5}),
            BenchResult("r-3", "p1", "manual", "int8", v1["int8"], "onnxruntime", "1.20.1",
                        {}, error="out of memory")], NOW)
        br.auto_requests(s, NOW)
    with store.read() as s:
        (row,) = requests(s).values()
        assert row.device_id == "e2" and named(row) == ["int8"]


def test_a_type_asked_before_is_not_asked_again_even_if_it_failed(store: Store) -> None:
    with store.session() as s:
        add_version(s, "detector", "v1", [("default", "onnx", {})])
        add_devices(s, "edge-box", ["e1", "e2"])
        ver = s.scalar(select(ModelVersion))
        (rid,) = br.request_benchmarks(s, ["e1"], variant_options(s, ver.id), now=NOW)
        s.get(BenchRequestRow, rid).done_at = NOW + timedelta(hours=1)  # timed out, no result
        s.flush()
        # asked on e1 by hand; e2 (same type, never asked) is not asked either
        assert br.auto_requests(s, NOW + timedelta(hours=2)) == []
    with store.read() as s:
        assert list(requests(s)) == [rid]


def test_offline_or_portraitless_devices_are_not_asked(store: Store) -> None:
    with store.session() as s:
        add_version(s, "detector", "v1", [("default", "onnx", {})])
        add_devices(s, "gone-box", ["g1", "g2"], online=False)
        upsert_devices_from_hellos(s, [Hello("bare", "1.0", {"runtimes": {"onnxruntime": "1.20.1"}},
                                             {"device-type": "bare-box"}, ())], NOW)
        assert br.auto_requests(s, NOW) == []
        add_devices(s, "edge-box", ["e1"])
        (rid,) = br.auto_requests(s, NOW)
    with store.read() as s:
        assert s.get(BenchRequestRow, rid).device_id == "e1"


def test_variants_that_do_not_fit_the_device_are_not_named(store: Store) -> None:
    with store.session() as s:
        add_version(s, "detector", "v1", [
            ("default", "onnx", {}), ("lite", "tflite", {}),  # no tflite runtime on the device
            ("gpu", "onnx", {"accelerator": "cuda"}),  # no cuda provider that works
            ("new-ops", "onnx", {"opset": {"ai.onnx": 23}}),  # ORT 1.20 implements up to 21
        ])
        add_devices(s, "edge-box", ["e1"])
        add_devices(s, "cuda-box", ["c1"], portrait={"accelerators": ["cpu", "cuda"]})
        add_devices(s, "tiny", ["t1"], portrait={"memory": {"available_bytes": 4 * MiB}})
        br.auto_requests(s, NOW)
    with store.read() as s:
        by_device = {r.device_id: named(r) for r in requests(s).values()}
    assert by_device == {"e1": ["default"], "c1": ["default", "gpu"]}  # tiny: nothing fits


def test_at_most_max_devices_requests_per_sweep_the_biggest_types_first(store: Store) -> None:
    with store.session() as s:
        add_version(s, "detector", "v1", [("default", "onnx", {})])
        sizes = {"t-a": 1, "t-b": 3, "t-c": 2, "t-d": 1, "t-e": 1}
        for t, n in sizes.items():
            add_devices(s, t, [f"{t}-{i}" for i in range(n)])
        swept = [br.auto_requests(s, NOW + timedelta(minutes=i), max_devices=2)
                 for i in range(4)]
        assert [len(ids) for ids in swept] == [2, 2, 1, 0]
        types = [[s.get(BenchRequestRow, rid).device_id.rsplit("-", 1)[0] for rid in ids]
                 for ids in swept]
    assert types[:3] == [["t-b", "t-c"], ["t-a", "t-d"], ["t-e"]]
    with store.read() as s:
        assert len(list(s.scalars(select(AuditEntry)))) == 3


def test_two_new_models_share_one_request_without_golden_inputs(store: Store) -> None:
    with store.session() as s:
        add_version(s, "detector", "v1", [("default", "onnx", {"golden": [{"x": 1}]})])
        add_version(s, "classifier", "v7", [("default", "onnx", {"golden": [{"y": 2}]})])
        add_devices(s, "edge-box", ["e1"])
        (rid,) = br.auto_requests(s, NOW)
        row = s.get(BenchRequestRow, rid)
        assert len(row.variants) == 3 and all(v["golden"] == [] for v in row.variants[1:])
        entry = s.scalar(select(AuditEntry))
        assert entry.subject == "classifier:v7, detector:v1"


def test_fleet_auto_bench_s_defaults_to_60_and_0_turns_it_off(tmp_path: Path) -> None:
    base = {"FLEET_HOME": str(tmp_path)}
    assert ServerConfig.from_env(base).auto_bench_s == 60.0
    assert ServerConfig.from_env({**base, "FLEET_AUTO_BENCH_S": "0"}).auto_bench_s == 0.0
    assert ServerConfig.from_env({**base, "FLEET_AUTO_BENCH_S": "1.5"}).auto_bench_s == 1.5
    with pytest.raises(UsageError, match="FLEET_AUTO_BENCH_S.*0 = off"):
        ServerConfig.from_env({**base, "FLEET_AUTO_BENCH_S": "-1"})


def test_a_device_with_an_open_request_is_not_the_one_asked(store: Store) -> None:
    """Its retained request topic holds one request: the type's next device is asked."""
    with store.session() as s:
        add_version(s, "detector", "v1", [("default", "onnx", {})])
        add_devices(s, "edge-box", ["e1", "e2"])  # e2 seen last
        ver = s.scalar(select(ModelVersion))
        br.request_benchmarks(s, ["e2"], variant_options(s, ver.id)[:1], now=NOW)
        add_version(s, "classifier", "v1", [("default", "onnx", {})])
        (rid,) = br.auto_requests(s, NOW)
        row = s.get(BenchRequestRow, rid)
        assert row.device_id == "e1" and len(named(row)) == 1  # detector: asked on e2 already


@pytest.mark.postgres
def test_one_replica_sweeps_at_a_time_on_postgresql(pg_url: str) -> None:
    upgrade(pg_url)
    store = Store(pg_url)
    with store.session() as s:
        add_version(s, "detector", "v1", [("default", "onnx", {})])
        add_devices(s, "edge-box", ["e1"])
    with store.session() as first, store.session() as second:
        assert first.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"),
                            {"k": br._SWEEP_LOCK})  # another replica is sweeping
        assert br.auto_requests(second, NOW) == []
    with store.session() as s:
        assert len(br.auto_requests(s, NOW)) == 1
