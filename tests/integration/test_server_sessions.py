"""Device events survive a server restart (persistent MQTT session) and are applied once
(durable de-duplication by event_id)."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from deltafleet.shared import encode
from deltafleet.shared.mqtt import MqttClient, MqttSettings
from tests.harness.rollout_lab import RolloutLab

pytestmark = pytest.mark.broker


@pytest.fixture
def lab(rollout_lab, onnx_pair) -> RolloutLab:
    lab = rollout_lab(onnx_pair(0.2), start=False)
    lab.cfg = dataclasses.replace(lab.cfg, server_id=f"fleet-server-test-{uuid.uuid4().hex[:6]}")
    lab.start_server()
    return lab


def test_events_sent_while_the_server_is_down_are_applied_after_it_returns(lab):
    ids = lab.add_devices(5, {"hw": "cam"})
    lab.group("cams", hw="cam")
    rid = lab.rollout("v2", "cams", health_window_s=3)
    lab.wait_for(lambda: lab.status(rid)["counts"].get("trial", 0) == 5, 30, "all in trial")
    lab.stop_server()
    lab.wait_for(lambda: all(any(s == "healthy" for s, _ in lab.fleet.devices[d].timeline)
                             for d in ids), 30, "devices report healthy while the server is down")
    assert lab.status(rid)["counts"].get("trial", 0) == 5  # nobody has applied them yet
    lab.start_server()
    data = lab.wait_state(rid, {"completed"}, 30)
    assert all(t["state"] == "healthy" for t in data["targets"])


def test_a_redelivered_event_is_applied_once(lab):
    (device_id,) = lab.add_devices(1, {"hw": "cam"})
    lab.group("cams", hw="cam")
    rid = lab.rollout("v2", "cams", health_window_s=1)
    lab.wait_state(rid, {"completed"}, 30)
    dev = lab.fleet.devices[device_id]
    healthy = next(e for e in dev.events if e.state == "healthy")
    before = lab.server.stats.duplicate_events
    replay = MqttClient(MqttSettings(lab.cfg.mqtt_url, f"replay-{uuid.uuid4().hex[:4]}"))
    replay.start()
    replay.wait_connected(10)
    replay.publish_wait(lab.fleet.topics.events(device_id), encode(healthy))
    replay.stop()
    lab.wait_for(lambda: lab.server.stats.duplicate_events > before, 10, "duplicate counted")
    assert lab.status(rid)["state"] == "completed"
