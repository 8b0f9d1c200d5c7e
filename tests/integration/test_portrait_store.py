"""Portraits, benchmarks and baselines in the store (SQLite and PostgreSQL): what the server
keeps per device, how a type's baseline aggregates its devices, what selection is given."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from deltafleet.server.fleet import portraits as fp
from deltafleet.server.fleet import upsert_devices_from_hellos
from deltafleet.server.store import Store
from deltafleet.server.store.models import BenchRequestRow
from deltafleet.shared import Hello
from deltafleet.shared.messages import BenchResult, Portrait

NOW = datetime(2026, 12, 2, tzinfo=UTC)
A, B = "a" * 64, "b" * 64


@pytest.fixture
def store(empty_store: Store) -> Store:
    return empty_store


def hello(device_id: str, mem: int, labels: dict[str, str] | None = None) -> Hello:
    return Hello(device_id, "1.0", {"arch": "aarch64", "cpu": "cortex-a72",
                                    "memory_bytes": mem, "runtimes": {"onnxruntime": "1.20.1"}},
                 labels or {}, ())


def result(device_id: str, sha: str, p50: int, rss: int, rid: str = "r1") -> BenchResult:
    return BenchResult(f"{rid}-{device_id}-{sha[0]}", device_id, rid, sha[0], sha,
                       "onnxruntime", "1.20.1",
                       {"p50_us": p50, "p95_us": p50 * 2, "load_ms": 5, "model_rss_bytes": rss,
                        "runs": 10})


def test_portraits_benchmarks_and_baselines_round_trip(store: Store) -> None:
    with store.session() as s:
        upsert_devices_from_hellos(s, [hello("d1", 4 << 30), hello("d2", 4 << 30),
                                       hello("d3", 1 << 30, {"device-type": "pi"})], NOW)
        stored = fp.record_portraits(s, [
            Portrait("d1", {"accelerators": ["cpu", "npu"], "memory": {"available_bytes": 3 << 30}}),
            Portrait("d3", {"memory": {"available_bytes": 100 << 20}}),
            Portrait("ghost", {}),  # never said hello: dropped
        ], NOW)
        assert stored == 2
        s.add(BenchRequestRow(id="r1", device_id="d1", envelope="", created_at=NOW,
                              variants=[{"runs": 10, "warmup": 1}, {"sha256": A}, {"sha256": B}]))
        s.flush()
        fp.record_bench_results(s, [result("d1", A, 100, 30 << 20), result("d2", A, 300, 50 << 20),
                                    result("d1", B, 40, 10 << 20)], NOW)
        fp.record_bench_results(s, [BenchResult("r1-x", "d3", "r1", "a", A, "onnxruntime", "1",
                                                {}, error="no onnx runtime")], NOW)
    with store.read() as s:
        assert s.get(BenchRequestRow, "r1").done_at is not None  # both variants of d1 in
        base = {(b.device_type, b.variant): b for b in fp.baselines(s)}
        a = base[("aarch64/cortex-a72/4GiB", "a")]
        assert a.devices == 2 and a.median["p50_us"] == 200 and a.spread["p50_us"] == (100, 300)
        assert ("pi", "a") not in base  # an error is no figure
        devices = list(fp.fleet_devices(s, ["d1", "d2", "d3"]))
        facts, own, figs = fp.selection_inputs(s, devices)
        assert facts["d1"].providers == frozenset({"cpu", "npu"})
        assert facts["d1"].memory_available_bytes == 3 << 30
        assert facts["d2"].memory_available_bytes == 4 << 30  # no portrait: the profile's
        assert facts["d3"].device_type == "pi"
        assert set(own["d1"]) == {A, B} and "d3" not in own
        assert figs[("aarch64/cortex-a72/4GiB", A)].p50_us == 200
        shown = fp.device_portrait_json(s, "d3")
        assert shown["benchmarks"][0]["error"] == "no onnx runtime"
        assert shown["portrait"]["device_type"] == "pi"
