"""The server treats every device message as hostile: malformed JSON, unknown shapes, huge
payloads, a device speaking for another — logged, counted, the device marked, no database
write, and the other devices keep being served."""

from __future__ import annotations

import json
import uuid

import pytest

from deltafleet.shared import Hello, encode
from deltafleet.shared.mqtt import MqttClient, MqttSettings
from tests.harness.rollout_lab import RolloutLab

pytestmark = pytest.mark.broker


@pytest.fixture
def lab(rollout_lab, onnx_pair) -> RolloutLab:
    return rollout_lab(onnx_pair(0.2))


def test_hostile_device_messages_write_nothing_and_the_fleet_keeps_working(lab):
    t = lab.fleet.topics
    attacker = MqttClient(MqttSettings(lab.cfg.mqtt_url, f"evil-{uuid.uuid4().hex[:4]}"))
    attacker.start()
    attacker.wait_connected(10)
    victim_hello = Hello("victim", "1", {"arch": "x86_64"}, {"hw": "cam"}, ())
    hostile = [
        (t.hello("evil"), b"{not json"),
        (t.hello("evil"), b"[1, 2, 3]"),
        (t.hello("evil"), json.dumps({"v": 1, "type": "hello", "device_id": "evil"}).encode()),
        (t.hello("evil"), b"x" * (512 * 1024)),
        (t.hello("evil"), encode(victim_hello)),  # speaking for another device
        (t.events("evil"), b'{"v":1,"type":"event","state":"healthy"}'),
        (t.chunk_request("evil"), b'{"v":1,"indices":[-1]}'),
    ] * 4
    for topic, payload in hostile:
        attacker.publish_wait(topic, payload)
    lab.wait_for(lambda: lab.server.stats.invalid_messages >= len(hostile), 20,
                 "every hostile message counted")
    assert lab.known_devices() == set()  # no database write from any of them
    assert lab.server.guard.is_suspect("evil")
    ids = lab.add_devices(3, {"hw": "cam"})  # the others are still served
    lab.group("cams", hw="cam")
    rid = lab.rollout("v2", "cams", health_window_s=1)
    assert lab.wait_state(rid, {"completed"}, 60)["state"] == "completed"
    assert lab.known_devices() == set(ids)
    attacker.stop()
