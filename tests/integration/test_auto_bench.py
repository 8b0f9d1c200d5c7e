"""Automatic benchmarks with real processes (broker, `fleetctl server` with
FLEET_AUTO_BENCH_S=1, a `fleet-agent` running onnxruntime): registering a version is enough
for the agent's figures of it to reach the baseline library; nobody runs `profile bench`."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.broker

TYPE = "auto-box"


def test_a_new_version_is_benchmarked_on_its_device_type_without_being_asked(
        tmp_path, broker) -> None:
    from tests.harness.fleetlab import Lab, wait_for
    from tests.harness.modelgen import make_onnx_model

    lab = Lab(tmp_path / "lab", mqtt_url=broker.url)
    lab.env["FLEET_TOPIC_PREFIX"] = "autobench/v1"  # the session broker is shared
    lab.env["FLEET_AUTO_BENCH_S"] = "1"
    try:
        model = make_onnx_model(tmp_path / "models" / "m.onnx", size_mb=0.5)
        lab.fleetctl("init")
        lab.start_server()
        lab.start_agent("auto-1", {"device-type": TYPE})
        wait_for(lambda: any(t["device_type"] == TYPE and t["devices"] == 1
                             for t in lab.fleetctl_json("profile", "list")), 20, "a portrait")
        assert lab.fleetctl_json("profile", "show", TYPE)["baselines"] == []
        lab.fleetctl("model", "add", "detector", "v1", str(model))

        def measured() -> list[dict]:
            return lab.fleetctl_json("profile", "show", TYPE)["baselines"]

        (b,) = wait_for(measured, 25, "the automatic benchmark's figures")
        assert b["variant"] == "default" and b["devices"] == 1 and b["auto"] == 1
        assert 0 < b["median"]["p50_us"] <= b["median"]["p95_us"]
        (row,) = lab.fleetctl_json("device", "show", "auto-1")["benchmarks"]
        assert row["request_id"].startswith("auto-") and row["runs"] == 20 and not row["error"]
        (t,) = [t for t in lab.fleetctl_json("profile", "list") if t["device_type"] == TYPE]
        assert t["variants_auto"] == ["default"]
        assert "default (auto)" in lab.fleetctl("profile", "list").stdout
        entries = [e for e in lab.fleetctl_json("audit") if e["action"] == "profile.bench.auto"]
        assert len(entries) == 1 and entries[0]["actor"] == "server"
        assert entries[0]["subject"] == "detector:v1"
    finally:
        lab.close()
