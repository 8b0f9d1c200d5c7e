"""SIGKILL the agent at every step of an update, many times over, on a real broker: after a
restart each device runs the old or the new verified model, the update finishes (or rolls
back) by itself, and the scripted server's last event agrees with what the device runs.

Devices run side by side (one agent process each) to keep the wall time down.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import bsdiff4
import pytest

from deltafleet.agent.store import InstalledModel, LocalStore
from deltafleet.shared import SigningKey, sha256_file
from tests.harness.mqtt_peer import Peer, make_slow_model

pytestmark = pytest.mark.broker

REPEATS = int(os.environ.get("FLEET_TEST_CRASH_REPEATS", "2"))
# step -> what the device must end on after the restart
STEPS = {
    "download": "v2", "patch": "v2", "stage": "v2", "activate": "v2", "trial": "v2",
    "commit": "v2", "rollback": "v1",
}
TERMINAL = ("healthy", "rolled_back", "failed", "rejected")


def seed_v1(state_dir: Path, v1: Path) -> None:
    store = LocalStore(state_dir)
    sha = sha256_file(v1)
    store.stage(sha, "onnx", v1.read_bytes())
    store.activate(InstalledModel("detector", "v1", sha, "default", "onnx", serial=1,
                                  manifest_id="seed"))


def test_sigkill_at_every_update_step_ends_on_a_verified_model(tmp_path: Path, broker):
    from tests.harness.fleetlab import Lab, wait_for
    from tests.harness.modelgen import make_onnx_pair

    v1, v2 = make_onnx_pair(tmp_path / "models", size_mb=0.5)
    slow = make_slow_model(tmp_path / "models" / "slow.onnx", depth=1200)  # 4-40 ms an inference
    delta = tmp_path / "models" / "v1-v2.bsdiff"
    bsdiff4.file_diff(str(v1), str(v2), str(delta))
    shas = {"v1": sha256_file(v1), "v2": sha256_file(v2)}
    key = SigningKey.generate()
    key.save(tmp_path / "signing.key", tmp_path / "signing.pub")
    lab = Lab(tmp_path / "lab", mqtt_url=broker.url)
    peer = Peer(broker.url, key)
    # 14 agents probe at once on a small machine: allow 4 ms of p95 jitter, far below the
    # slow model's extra latency, so only the breaching model is rolled back
    policy = {"max_error_rate_ppm": 1000, "max_p95_ratio_pct": 150, "min_requests": 20,
              "p95_slack_us": 4000}
    devices = {f"crash-{step}-{i}": step for step in STEPS for i in range(REPEATS)}
    manifests = {}
    try:
        procs = {}
        for device, step in devices.items():
            seed_v1(lab.agent_dir(device), v1)
            procs[device] = lab.start_agent(device, {"hw": "test"}, trusted_key=tmp_path / "signing.pub",
                                            extra_env={"FLEET_AGENT_CRASH_AT": step,
                                                       "FLEET_AGENT_API_PORT": "0"})
        for device, step in devices.items():
            if step == "rollback":  # a breaching model, so the update reaches the rollback step
                manifests[device] = peer.offer(device, "detector", "v2", slow, serial=2,
                                               trial_window_s=1, health_policy=policy)
            else:
                manifests[device] = peer.offer(device, "detector", "v2", v2, serial=2,
                                               artifact=delta, base_sha256=shas["v1"],
                                               trial_window_s=1, health_policy=policy)
        for device, proc in procs.items():
            try:
                assert proc.wait(60) == -9, f"{device} was not killed at {devices[device]}"
            except subprocess.TimeoutExpired:
                pytest.fail(f"{device} never reached step {devices[device]}\n"
                            f"{lab.log('agent-' + device)[-2000:]}")
        for device in devices:  # restart without the fault: it must finish by itself
            lab.start_agent(device, {"hw": "test"}, trusted_key=tmp_path / "signing.pub",
                            extra_env={"FLEET_AGENT_API_PORT": "0"})

        def terminal(device: str):
            mid = manifests[device].manifest_id
            done = [e for e in peer.device_events(device)
                    if e.manifest_id == mid and e.state in TERMINAL]
            return done[-1] if done else None

        wait_for(lambda: all(terminal(d) for d in devices), 90, "every device to finish")
        for device, step in devices.items():
            ev = terminal(device)
            expected = STEPS[step]
            status = lab.agent_status(device)
            assert status, device
            running = status[0]["sha256"]
            assert running in (shas["v1"], shas["v2"]) or step == "rollback", (device, status)
            assert ev.state == ("rolled_back" if expected == "v1" else "healthy"), (device, ev)
            assert running == shas[expected], (device, step, status)
            assert ev.sha256 == running, (device, "server view differs from the device")
            state_dir = lab.agent_dir(device)
            model_file = state_dir / "models" / f"{running}.onnx"
            assert sha256_file(model_file) == running  # never a partial file
            assert not list((state_dir / "journal").glob("*.json")), device
            assert not list((state_dir / "models").glob(".*.tmp")), device
            ids = [e.event_id for e in peer.device_events(device)]
            states = {e.event_id: e.state for e in peer.device_events(device)}
            assert len(set(states.values())) == len(set(ids)), (device, "one id per state")
    finally:
        peer.close()
        lab.close()
