"""Device portraits and on-device benchmarks with real processes (broker, `fleetctl server`,
`fleet-agent`s, onnxruntime): the portrait a real agent sends, benchmarks it runs on request
(files fetched as chunks) stored per device and aggregated per type, and a mixed fleet where
measurement, not a label, sends INT8 to the small device and FP32 to the large ones."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.broker

DEVICES = ("big-1", "big-2")
LABELS = {"site": "lab", "device-type": "edge-box"}  # one label for all: not what decides


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, broker) -> Iterator[dict]:
    from tests.harness.fleetlab import Lab, wait_for
    from tests.harness.modelgen import make_int8_variant, make_onnx_model

    root = tmp_path_factory.mktemp("portrait")
    lab = Lab(root / "lab", mqtt_url=broker.url)
    lab.env["FLEET_TOPIC_PREFIX"] = "portrait/v1"  # the session broker is shared
    try:
        fp32 = make_onnx_model(root / "models" / "fp32.onnx", size_mb=12.0)
        int8 = make_int8_variant(fp32, root / "models" / "int8.onnx")
        lab.fleetctl("init")
        lab.fleetctl("model", "add", "detector", "v1", str(fp32))
        lab.fleetctl("model", "add", "detector", "v1", str(int8), "--variant", "int8",
                     "--precision", "int8")
        lab.fleetctl("group", "create", "lab", "--match", "site=lab")
        lab.start_server()
        for device_id in DEVICES:
            lab.start_agent(device_id, LABELS)
        wait_for(lambda: lab.online_devices() >= set(DEVICES), 30, "agents online")
        yield {"lab": lab, "root": root, "wait_for": wait_for}
    finally:
        lab.close()


def _show(lab, device_id: str) -> dict:
    """``device show --json``; {} while the device has not said hello yet."""
    import json

    res = lab.fleetctl("device", "show", device_id, "--json", check=False)
    if res.returncode == 2 and "no device" in res.stderr:
        return {}
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _benched(lab, device_id: str, n: int) -> list[dict]:
    rows = _show(lab, device_id).get("benchmarks") or []
    return rows if len(rows) >= n else []


def test_a_real_agent_reports_the_providers_and_versions_onnxruntime_has(fleet):
    import onnxruntime as ort

    lab = fleet["lab"]
    shown = fleet["wait_for"](lambda: _show(lab, "big-1").get("portrait"), 30, "a portrait")
    doc = shown["portrait"]
    assert shown["device_type"] == "edge-box"
    assert [p["name"] for p in doc["providers"]] == ort.get_available_providers()
    assert next(p for p in doc["providers"] if p["name"] == "CPUExecutionProvider")["ok"]
    assert doc["runtimes"]["onnxruntime"] == ort.__version__
    assert "cpu" in doc["accelerators"]
    assert doc["memory"]["available_bytes"] > 0 and doc["disk"]["free_bytes"] > 0


def test_benchmarks_are_run_on_request_stored_per_device_and_aggregated_per_type(fleet):
    import onnxruntime as ort

    lab = fleet["lab"]
    lab.fleetctl("profile", "bench", "detector:v1", "--group", "lab", "--runs", "30")
    for device_id in DEVICES:
        rows = fleet["wait_for"](lambda d=device_id: _benched(lab, d, 2), 60,
                                 f"benchmarks of {device_id}")
        assert {r["variant"] for r in rows} == {"default", "int8"}
        for r in rows:
            assert r["error"] is None, r
            assert r["runtime"] == "onnxruntime" and r["runtime_version"] == ort.__version__
            assert 0 < r["p50_us"] <= r["p95_us"] and r["load_ms"] >= 0 and r["runs"] == 30
            assert r["model_rss_bytes"] > 0
        by = {r["variant"]: r for r in rows}
        assert by["int8"]["model_rss_bytes"] < by["default"]["model_rss_bytes"]
    types = {t["device_type"]: t for t in lab.fleetctl_json("profile", "list")}
    assert types["edge-box"]["devices_measured"] == 2
    assert types["edge-box"]["variants_measured"] == ["default", "int8"]
    shown = lab.fleetctl_json("profile", "show", "edge-box")
    for b in shown["baselines"]:
        assert b["devices"] == 2
        lo, hi = b["spread"]["p50_us"]
        assert lo <= b["median"]["p50_us"] <= hi
    assert lab.fleetctl("profile", "show", "no-such-type", check=False).returncode == 2
    assert "edge-box" in lab.fleetctl("profile", "list").stdout
    assert "int8" in lab.fleetctl("profile", "show", "edge-box").stdout
    assert "own benchmarks" in lab.fleetctl("device", "show", "big-1").stdout


def test_int8_goes_to_the_small_device_and_fp32_to_the_large_by_measurement(fleet):
    lab, root, wait_for = fleet["lab"], fleet["root"], fleet["wait_for"]
    if not _benched(lab, "big-1", 2):  # run alone: benchmark first
        test_benchmarks_are_run_on_request_stored_per_device_and_aggregated_per_type(fleet)
    by = {r["variant"]: r for r in _show(lab, "big-1")["benchmarks"]}
    fp32_rss, int8_rss = by["default"]["model_rss_bytes"], by["int8"]["model_rss_bytes"]
    # the small device: a cgroup limit that leaves room (75%) between the two measured sizes
    headroom = int((fp32_rss + int8_rss) / 2 / 0.75)
    cg = root / "small-sys" / "fs" / "cgroup"
    cg.mkdir(parents=True)
    (cg / "memory.max").write_text(f"{headroom}\n")
    (cg / "memory.current").write_text("0\n")
    lab.start_agent("small-1", LABELS, extra_env={"FLEET_AGENT_SYSFS_ROOT": str(root / "small-sys")})
    wait_for(lambda: (_show(lab, "small-1").get("portrait") or {}).get("portrait", {})
             .get("memory", {}).get("available_bytes") == headroom, 30, "small portrait")
    lab.fleetctl("profile", "bench", "detector:v1", "--device", "small-1", "--runs", "20")
    wait_for(lambda: _benched(lab, "small-1", 2), 60, "benchmarks of small-1")

    plan = lab.fleetctl_json("rollout", "plan", "v1", "--group", "lab", "--prefer", "accuracy")
    got = {d["device"]: d["variant"] for d in plan["devices"]}
    assert got == {"big-1": "default", "big-2": "default", "small-1": "int8"}, plan
    # the static estimate (2x the file) would have let FP32 onto the small device:
    # only the measured memory keeps it out
    fp32_file = next(d["full_bytes"] for d in plan["devices"] if d["device"] == "big-1")
    assert 2 * fp32_file <= 0.75 * headroom or fp32_rss > 0.75 * headroom
    (edge,) = plan["device_types"]
    assert edge["device_type"] == "edge-box" and edge["devices"] == 3
    human = lab.fleetctl("rollout", "plan", "v1", "--group", "lab", "--prefer", "accuracy").stdout
    assert "selection by accuracy" in human and "edge-box" in human
    size = lab.fleetctl_json("rollout", "plan", "v1", "--group", "lab", "--prefer", "size")
    assert {d["variant"] for d in size["devices"]} == {"int8"}
    bad = lab.fleetctl("rollout", "plan", "v1", "--group", "lab", "--prefer", "speed",
                       check=False)
    assert bad.returncode == 2 and "unknown objective" in bad.stderr
