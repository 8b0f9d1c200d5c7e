"""Golden inputs and the signed IO contract, end to end: fleetctl registers a model with
golden inputs, the server signs them and the model's IO signature into the manifest, and a
real fleet-agent warms the new model up on them before the swap: a model that answers them
with NaN is refused, the device keeps serving the old one, and the reason reaches the
operator."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from deltafleet.shared import sha256_file

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_model_that_fails_its_golden_inputs_is_refused_before_the_swap(tmp_path: Path, broker):
    from tests.harness.fleetlab import Lab, wait_for
    from tests.harness.modelgen import make_onnx_model
    from tests.harness.mqtt_peer import make_nan_on_negative_model

    lab = Lab(tmp_path / "lab", mqtt_url=broker.url)
    lab.env["FLEET_TOPIC_PREFIX"] = "golden/v1"
    try:
        v1 = make_onnx_model(tmp_path / "v1.onnx", size_mb=0.2)
        v2 = make_nan_on_negative_model(tmp_path / "v2.onnx")  # finite on zeros, NaN on < 0
        golden = tmp_path / "negative.npz"
        np.savez(golden, input=-np.ones((1, 64), dtype=np.float32))
        lab.fleetctl("init")
        lab.fleetctl("model", "add", "detector", "v1", str(v1), "--golden", str(golden))
        lab.fleetctl("model", "add", "detector", "v2", str(v2), "--golden", str(golden))
        shown = lab.fleetctl_json("model", "show", "detector")
        variants = [v["variants"][0] for v in shown["versions"]]
        assert [v["golden_inputs"] for v in variants] == [1, 1]
        assert variants[1]["io_signature"] == {
            "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 64]}],
            "outputs": [{"name": "output", "dtype": "float32", "shape": [None, 10]}]}
        lab.fleetctl("group", "create", "cams", "--match", "hw=cam")
        lab.start_server()
        lab.start_agent("cam-1", {"hw": "cam"})
        wait_for(lambda: "cam-1" in lab.online_devices(), 30, "agent online")

        r1 = lab.fleetctl_json("rollout", "model", "v1", "--group", "cams", "--wait",
                               "--timeout", "60", "--health-window", "1s")
        assert r1["state"] == "completed"
        manifest = _stored_manifest(lab, r1["id"])
        assert manifest["io_signature"] == variants[0]["io_signature"]
        assert len(manifest["golden_inputs"]) == 1

        res = lab.fleetctl("rollout", "model", "v2", "--group", "cams", "--wait", "--timeout",
                           "60", "--health-window", "1s", "--max-attempts", "1", "--json",
                           check=False)
        r2 = json.loads(res.stdout)
        (target,) = r2["targets"]
        assert target["state"] == "failed", target
        assert "NaN" in target["reason"], target
        assert res.returncode != 0 and r2["state"] == "paused"
        (running,) = lab.agent_status("cam-1")
        assert running["version"] == "v1" and running["sha256"] == sha256_file(v1)
    finally:
        lab.close()


def _stored_manifest(lab, rollout_id: int) -> dict:
    """The signed manifest the server recorded for the rollout's one target (its payload)."""
    db = Path(lab.env["FLEET_HOME"]) / "fleet.db"
    with sqlite3.connect(db) as conn:
        (signed,) = conn.execute("SELECT manifest FROM rollout_targets WHERE rollout_id = ?",
                                 (rollout_id,)).fetchone()
    return json.loads(signed)["payload"]
