"""The device portrait (agent.portrait) on a fixture sysfs/proc tree, the server's field
checks (guard.check_portrait) and the portrait / bench wire messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltafleet.agent.portrait import (
    cgroup_memory_headroom,
    device_portrait,
    power_readings,
    rapl_energy_uj,
    tiny_onnx_model,
)
from deltafleet.server.guard import check_portrait
from deltafleet.shared import ArtifactRef, WireError, encode
from deltafleet.shared.messages import (
    BenchRequest,
    BenchResult,
    BenchVariant,
    Portrait,
    decode,
)

SHA = "ab" * 32


def sysfs(tmp_path: Path) -> Path:
    root = tmp_path / "sys"
    for zone, name, energy in (("intel-rapl:0", "package-0", "123456789"),
                               ("intel-rapl:1", "package-1", "1000"),
                               ("intel-rapl:0:0", "core", "55")):
        d = root / "class/powercap" / zone
        d.mkdir(parents=True)
        (d / "name").write_text(name + "\n")
        (d / "energy_uj").write_text(energy + "\n")
    hw = root / "class/hwmon/hwmon3"
    hw.mkdir(parents=True)
    (hw / "name").write_text("ina3221\n")
    (hw / "power1_input").write_text("4200000\n")
    (hw / "power1_label").write_text("VDD_IN\n")
    (hw / "power2_input").write_text("garbage\n")
    cg = root / "fs/cgroup"
    cg.mkdir(parents=True)
    (cg / "memory.max").write_text(str(256 << 20) + "\n")
    (cg / "memory.current").write_text(str(56 << 20) + "\n")
    return root


def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    (root / "self").mkdir(parents=True)
    (root / "self/cgroup").write_text("0::/\n")
    (root / "meminfo").write_text("MemTotal:        4000000 kB\nMemAvailable:    3000000 kB\n")
    (root / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Test CPU\n"
                                  "flags\t\t: fpu avx2 avx512_vnni sse\n")
    return root


def test_rapl_packages_are_summed_and_subzones_skipped(tmp_path):
    assert rapl_energy_uj(sysfs(tmp_path)) == 123456789 + 1000
    assert rapl_energy_uj(tmp_path / "nothing") is None


def test_power_sensors_that_read_are_listed(tmp_path):
    readings = power_readings(sysfs(tmp_path))
    assert {"kind": "hwmon", "name": "ina3221:VDD_IN", "power_uw": 4200000} in readings
    assert {"kind": "rapl", "name": "intel-rapl:0:package-0", "energy_uj": 123456789} in readings
    assert not any(r["name"].endswith("power2_input") for r in readings)  # unreadable: left out


def test_cgroup_limit_caps_available_memory(tmp_path):
    s, p = sysfs(tmp_path), proc(tmp_path)
    assert cgroup_memory_headroom(s, p) == 200 << 20
    doc = device_portrait(tmp_path, sysfs_root=s, proc_root=p)
    assert doc["memory"]["total_bytes"] == 4000000 * 1024
    assert doc["memory"]["available_bytes"] == 200 << 20
    assert doc["cpu"]["model"] == "Test CPU" and doc["cpu"]["flags"] == ["avx2", "avx512_vnni"]
    assert len(doc["power"]) == 4


def test_portrait_lists_what_onnxruntime_opens(tmp_path):
    import onnxruntime as ort  # the workspace installs it: a missing runtime fails
    doc = device_portrait(tmp_path, sysfs_root=tmp_path / "none", proc_root=proc(tmp_path))
    names = [p["name"] for p in doc["providers"]]
    assert names == ort.get_available_providers()
    cpu = next(p for p in doc["providers"] if p["name"] == "CPUExecutionProvider")
    assert cpu["ok"] is True and "cpu" in doc["accelerators"]
    assert doc["runtimes"]["onnxruntime"] == ort.__version__
    assert doc["power"] == []


def test_tiny_model_is_a_valid_identity_graph():
    import numpy as np
    import onnxruntime as ort  # the workspace installs it: a missing runtime fails

    sess = ort.InferenceSession(tiny_onnx_model(), providers=["CPUExecutionProvider"])
    x = np.arange(4, dtype=np.float32)
    assert (sess.run(None, {"x": x})[0] == x).all()


def test_server_checks_every_portrait_field(tmp_path):
    doc = device_portrait(tmp_path, sysfs_root=sysfs(tmp_path), proc_root=proc(tmp_path))
    assert check_portrait(doc)["memory"]["available_bytes"] == 200 << 20
    bad = [
        {**doc, "extra": 1},
        {**doc, "providers": [{"runtime": "onnxruntime", "name": "X", "ok": "yes"}]},
        {**doc, "providers": [{"runtime": "o", "name": "x" * 500, "ok": True}]},
        {**doc, "accelerators": ["cpu"] * 100},
        {**doc, "memory": {"total_bytes": -1}},
        {**doc, "disk": {"free_bytes": True}},
        {**doc, "power": [{"kind": "rapl", "name": "a\x00b"}]},
        {**doc, "runtimes": {"onnxruntime": 1}},
    ]
    for d in bad:
        with pytest.raises(WireError):
            check_portrait(d)


def test_portrait_message_round_trips_and_is_bounded():
    p = Portrait("dev-1", {"runtimes": {"onnxruntime": "1.20"}})
    assert decode(Portrait, encode(p)) == p
    with pytest.raises(WireError, match="over"):
        decode(Portrait, encode(Portrait("dev-1", {"python": "x" * 20000})))


def test_bench_request_and_result_round_trip_and_refuse_bad_fields():
    art = ArtifactRef("full", "identity", SHA, 10, 65536, ("cd" * 32,))
    req = BenchRequest("b1", "dev-1", 1, 2, (BenchVariant("int8", SHA, "onnx", 10, art),), 20, 2)
    assert decode(BenchRequest, encode(req)) == req
    wire = req.to_wire()
    wire["variants"][0]["artifact"]["codec"] = "zstd"
    with pytest.raises(WireError, match="identity"):
        BenchRequest.from_wire(wire)
    with pytest.raises(WireError, match="runs"):
        BenchRequest.from_wire({**req.to_wire(), "runs": 0})
    res = BenchResult("b1-0", "dev-1", "b1", "int8", SHA, "onnxruntime", "1.20",
                      {"p50_us": 10, "p95_us": 12, "runs": 20})
    assert decode(BenchResult, encode(res)) == res
    with pytest.raises(WireError, match="figures"):
        BenchResult.from_wire({**res.to_wire(), "figures": {"speed": 1}})


def _signed(key, **over) -> bytes:
    art = ArtifactRef("full", "identity", SHA, 10, 65536, ("cd" * 32,))
    fields = {"request_id": "b1", "device_id": "dev-1", "issued_at": 1, "expires_at": 2**40,
              "variants": (BenchVariant("int8", SHA, "onnx", 10, art),)}
    fields.update(over)
    return key.sign_bytes(BenchRequest(**fields).to_wire())


def test_a_bench_request_is_verified_like_a_manifest():
    from deltafleet.agent.bench import verify_bench_request
    from deltafleet.agent.trust import PinnedKeys
    from deltafleet.shared import DeltafleetError, SigningKey

    key, other = SigningKey.generate(), SigningKey.generate()
    trust = PinnedKeys([key.public_key])
    assert verify_bench_request(_signed(key), trust, "dev-1").request_id == "b1"
    for data, device in ((_signed(other), "dev-1"), (_signed(key), "dev-2"),
                         (_signed(key, expires_at=5), "dev-1")):
        with pytest.raises(DeltafleetError):
            verify_bench_request(data, trust, device)
