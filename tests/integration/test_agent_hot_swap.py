"""Hot swap in a real fleet-agent process under live API traffic: no request fails, whether
the new model is loaded beside the old one (warm) or after it (cold, requests held)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltafleet.shared import SigningKey, sha256_file
from tests.harness.mqtt_peer import Peer
from tests.harness.traffic import PredictTraffic

pytestmark = pytest.mark.broker


@pytest.mark.parametrize("mode", ["warm", "cold"])
def test_swaps_under_traffic_fail_no_request(tmp_path: Path, broker, mode: str):
    from tests.harness.fleetlab import Lab, free_port, wait_port
    from tests.harness.modelgen import make_onnx_pair

    v1, v2 = make_onnx_pair(tmp_path / "models", size_mb=1.0)
    key = SigningKey.generate()
    key.save(tmp_path / "signing.key", tmp_path / "signing.pub")
    lab = Lab(tmp_path / "lab", mqtt_url=broker.url)
    peer = Peer(broker.url, key)
    device = f"swap-{mode}"
    port = free_port()
    try:
        lab.start_agent(device, {"hw": "test"}, trusted_key=tmp_path / "signing.pub",
                        extra_env={"FLEET_AGENT_API_PORT": str(port),
                                   "FLEET_AGENT_SWAP_MODE": mode})
        m = peer.offer(device, "detector", "v1", v1, serial=1)
        peer.wait_event(lambda e: e.manifest_id == m.manifest_id and e.state == "healthy", 60)
        wait_port(port)
        with PredictTraffic(port, threads=3) as traffic:
            for serial, (path, version) in enumerate([(v2, "v2"), (v1, "v1"), (v2, "v2")],
                                                     start=2):
                m = peer.offer(device, "detector", version, path, serial=serial,
                               trial_window_s=1)
                ev = peer.wait_event(lambda e, mid=m.manifest_id: e.manifest_id == mid
                                     and e.state in ("healthy", "rolled_back", "failed"), 60)
                assert ev.state == "healthy", ev.reason
        answered = traffic.answered
        assert not traffic.failures, traffic.failures[:3]
        assert answered.count("v1") and answered.count("v2")
        assert answered[-1] == "v2" and None not in answered  # never the fallback, never none
        assert lab.agent_status(device)[0]["sha256"] == sha256_file(v2)
        assert "cold swap of detector" in lab.log(f"agent-{device}") or mode == "warm"
    finally:
        peer.close()
        lab.close()
