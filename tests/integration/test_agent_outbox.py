"""Broker stopped for a while and the agent restarted during the outage: every event still
reaches the server, once per event id, when the broker is back.

The broker keeps its state on disk (``persistence true``) and the recording "server" holds a
persistent session, as a production server must, so the broker queues for it while it is away.
"""

from __future__ import annotations

import signal
import threading
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from deltafleet.shared import Ack, Event, SigningKey, Topics, decode, encode
from tests.harness.broker import PersistentBroker
from tests.harness.mqtt_peer import Peer

pytestmark = pytest.mark.broker


class Recorder:
    """The server's side of event delivery: a persistent MQTT session, QoS 1, and an ack per
    event once it is recorded (the agent's outbox keeps an event until then)."""

    def __init__(self, port: int) -> None:
        self.events: list[Event] = []
        self.lock = threading.Lock()
        self.barrier_topic = f"barrier/{uuid.uuid4().hex[:8]}"
        self.passed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"rec-{uuid.uuid4().hex[:6]}",
                                  protocol=paho.MQTTv311, clean_session=False)
        self.client.on_connect = lambda c, *a: c.subscribe(
            [(Topics().all_devices("events"), 1), (self.barrier_topic, 1)])
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic == self.barrier_topic:
            self.passed.set()
            return
        ev = decode(Event, msg.payload)
        with self.lock:
            self.events.append(ev)
        client.publish(Topics().ack(ev.device_id), encode(Ack(ev.device_id, (ev.event_id,))),
                       qos=1)

    def barrier(self, timeout_s: float = 10.0) -> None:
        """Until everything the broker took before this call has reached the recorder: a
        marker published now is queued for it behind those messages."""
        self.passed.clear()
        self.client.publish(self.barrier_topic, b"", qos=1)
        assert self.passed.wait(timeout_s), "the barrier marker never came back"

    def snapshot(self) -> list[Event]:
        with self.lock:
            return list(self.events)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_events_survive_a_broker_outage_and_an_agent_restart(tmp_path: Path):
    from tests.harness.fleetlab import Lab, wait_for
    from tests.harness.modelgen import make_onnx_model

    (tmp_path / "broker").mkdir()
    broker = PersistentBroker(tmp_path / "broker")
    broker.start()
    key = SigningKey.generate()
    key.save(tmp_path / "signing.key", tmp_path / "signing.pub")
    recorder = Recorder(broker.port)
    peer = Peer(broker.url, key)
    lab = Lab(tmp_path / "lab", mqtt_url=broker.url)
    device = "outage-1"
    outbox = lab.agent_dir(device) / "outbox"
    try:
        wait_for(lambda: recorder.client.is_connected(), 10, "recorder connected")
        a = make_onnx_model(tmp_path / "a.onnx", size_mb=0.3, seed=1)
        b = make_onnx_model(tmp_path / "b.onnx", size_mb=0.3, seed=2)
        env = {"FLEET_AGENT_API_PORT": "0"}
        lab.start_agent(device, {"hw": "test"}, trusted_key=tmp_path / "signing.pub", extra_env=env)
        ma = peer.offer(device, "alpha", "v1", a, serial=1, trial_window_s=2)
        mb = peer.offer(device, "beta", "v1", b, serial=2, trial_window_s=8)
        wait_for(lambda: {e.manifest_id for e in recorder.snapshot() if e.state == "trial"}
                 >= {ma.manifest_id, mb.manifest_id}, 30, "both trials to start")

        broker.stop()  # outage: alpha's verdict is made while nobody listens
        wait_for(lambda: len(list(outbox.glob("*.json"))) >= 1, 15, "alpha's report in the outbox")
        lab.stop(f"agent-{device}", signal.SIGKILL)  # beta's trial is still running
        lab.start_agent(device, {"hw": "test"}, trusted_key=tmp_path / "signing.pub", extra_env=env)
        wait_for(lambda: len(list(outbox.glob("*.json"))) >= 2, 20, "beta's report in the outbox")
        broker.start()

        def delivered() -> bool:
            healthy = {e.manifest_id for e in recorder.snapshot() if e.state == "healthy"}
            return healthy >= {ma.manifest_id, mb.manifest_id}

        wait_for(delivered, 60, "both healthy reports after the outage")
        wait_for(lambda: not list(outbox.glob("*.json")), 10, "the outbox to drain")
        recorder.barrier()  # any duplicate the broker took has arrived before counting
        events = recorder.snapshot()
        by_id = {e.event_id: e for e in events}
        for m in (ma, mb):
            states = sorted(e.state for e in by_id.values() if e.manifest_id == m.manifest_id)
            assert states == ["applying", "downloading", "healthy", "trial"], (m.model, states)
        assert all(e.sha256 for e in by_id.values() if e.state == "healthy")
    finally:
        recorder.close()
        peer.close()
        lab.close()
        broker.stop()
