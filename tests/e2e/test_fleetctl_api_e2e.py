"""The management API end to end, driven only by `fleetctl` as a CI job runs it: a real
`fleetctl server` with its API on HTTPS, the session's Mosquitto and two fleet-agent processes;
the job has the API's URL, an admin token in a file and the listener's CA, and no FLEET_HOME.
The pipeline script of docs/api.md ("Example: a pipeline") runs as the doc prints it (read
from the doc, so the doc cannot rot): it registers a model, has the server make its INT8
variant, shows the plan, rolls it out with --wait, and the devices run it. A rollout the
devices refuse makes `--wait` exit non-zero."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deltafleet.shared import sha256_file
from tests.harness.fleetlab import BIN, wait_for
from tests.harness.modelgen import make_onnx_model
from tests.harness.mqtt_peer import make_nan_on_negative_model
from tests.harness.remote_fleet import api_fleet, client_env, remote

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
DEVICES = ("jet-1", "jet-2")
COMMIT = "abc1234"


def pipeline_script() -> str:
    """The shell script under the doc's "Example: a pipeline" heading, as printed there."""
    text = DOC.read_text()
    section = text[text.index("## Example: a pipeline"):]
    match = re.search(r"```sh\n(#!/bin/sh\n.*?)```", section, re.S)
    assert match, "docs/api.md lost its pipeline script"
    return match.group(1)


def api_json(fleet, *args: str, role: str = "viewer") -> Any:
    res = remote(fleet, *args, "--json", role=role)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def running(fleet) -> dict[str, list[tuple[str, str]]]:
    """What each device runs, as `fleetctl device list --json` says through the API."""
    return {d["id"]: [(m["model"], m["version"]) for m in d["running"]]
            for d in api_json(fleet, "device", "list")}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, broker):
    root = tmp_path_factory.mktemp("e2e-api")
    fleet = api_fleet(root, broker.url, "e2e-api/v1")
    try:
        for device_id in DEVICES:
            fleet["lab"].start_agent(device_id, {"hw": "jetson", "site": "lab"})
        made = remote(fleet, "group", "create", "jetson", "--match", "hw=jetson")
        assert made.returncode == 0, made.stderr
        wait_for(lambda: {d["id"] for d in api_json(fleet, "device", "list") if d["online"]}
                 == set(DEVICES), 60, "agents online (through the API)")
        yield fleet
    finally:
        fleet["lab"].close()


def test_the_docs_pipeline_registers_optimizes_and_rolls_out_through_the_api(fleet, tmp_path):
    secrets, build = tmp_path / "secrets", tmp_path / "build"
    secrets.mkdir()
    build.mkdir()
    (secrets / "fleet-token").write_text(fleet["tokens"]["admin"] + "\n")
    shutil.copy(fleet["ca"], secrets / "fleet-ca.pem")
    model = make_onnx_model(build / "detector.onnx", size_mb=0.5)
    np.savez(build / "golden.npz", input=np.ones((1, 64), dtype=np.float32))
    (tmp_path / "pipeline.sh").write_text(pipeline_script())
    env = {k: v for k, v in client_env(fleet, "admin").items() if not k.startswith("FLEET_")}
    env.update({"PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
                "FLEET_API_URL": fleet["url"], "FLEET_GROUP": "jetson",
                "HEALTH_WINDOW": "1s", "CI_SECRETS": str(secrets),
                "CI_COMMIT_SHORT_SHA": COMMIT, "FLEET_HOME": str(tmp_path / "no-home")})
    job = subprocess.run(["sh", str(tmp_path / "pipeline.sh")], cwd=tmp_path, env=env,
                         text=True, capture_output=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert not (tmp_path / "no-home").exists()  # nothing but the API was used

    (version,) = [v["version"] for v in api_json(fleet, "model", "show", "detector")["versions"]
                  if v["version"].endswith(f"-{COMMIT}")]
    variants = {x["name"]: x for v in api_json(fleet, "model", "show", "detector")["versions"]
                if v["version"] == version for x in v["variants"]}
    assert set(variants) == {"default", "int8"} and variants["default"]["golden_inputs"] == 1
    assert "made from" in job.stdout and "output deviation" in job.stdout  # inspect's table
    assert re.search(r"rollout \d+ started", job.stdout), job.stdout
    assert running(fleet) == dict.fromkeys(DEVICES, [("detector", version)])
    for device_id in DEVICES:
        assert fleet["lab"].agent_status(device_id)[0]["sha256"] == sha256_file(model)
    actors = {e["action"]: e["actor"] for e in api_json(fleet, "audit")}
    for action in ("model.add", "model.optimize", "rollout.create"):
        assert actors[action] == "api:admin-1", (action, actors)


def test_a_rollout_the_devices_refuse_makes_wait_exit_non_zero(fleet, tmp_path):
    before = running(fleet)
    bad = make_nan_on_negative_model(tmp_path / "bad.onnx")  # NaN on negative inputs
    np.savez(tmp_path / "negative.npz", input=-np.ones((1, 64), dtype=np.float32))
    added = remote(fleet, "model", "add", "detector", "v-bad", str(bad), "--golden",
                   str(tmp_path / "negative.npz"), role="admin")
    assert added.returncode == 0, added.stderr
    res = remote(fleet, "rollout", "model", "detector:v-bad", "--group", "jetson",
                 "--health-window", "1s", "--max-attempts", "1", "--wait", "--timeout", "90s",
                 "--json")
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr
    status = json.loads(res.stdout)
    assert status["state"] in ("paused", "rolled_back", "aborted"), status
    assert any("NaN" in (t["reason"] or "") for t in status["targets"]), status["targets"]
    assert running(fleet) == before  # the devices kept what they ran
