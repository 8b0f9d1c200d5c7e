"""Hostile infrastructure: the broker is SIGKILLed twice in the middle of a rollout.

A PUBACK only says the broker took a message; a broker that dies (or has nobody subscribed
yet after its restart) drops it afterwards. The agent's outbox therefore keeps every event until
the server acks it on ``{prefix}/dev/{id}/ack`` after its database commit. Here: 20 real
``fleet-agent`` processes, a real ``fleetctl server`` process on PostgreSQL, a real Mosquitto
with on-disk persistence (autosave every second) killed with SIGKILL twice and restarted on the
same port with the same persistence directory. Every device's events end up in
``device_events`` exactly once, every outbox drains, and the rollout completes untouched.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from deltafleet.server.store.models import DeviceEvent, RolloutTarget
from deltafleet.shared import Ack, Event, Topics, decode, encode
from deltafleet.shared.messages import MAX_ACK_BYTES
from deltafleet.shared.mqtt import MqttClient, MqttSettings
from tests.harness.broker import PersistentBroker, has_mosquitto
from tests.harness.need import missing
from tests.harness.rollout_lab import RolloutLab
from tests.harness.tls_broker import Peer

pytestmark = pytest.mark.broker

DEVICES = 20
LIFECYCLE = ("downloading", "applying", "trial", "healthy")


@pytest.fixture
def crash_broker(tmp_path: Path) -> Iterator[PersistentBroker]:
    """Mosquitto with persistence on disk (autosave every second), SIGKILLed and restarted on
    the same port and dir."""
    if not has_mosquitto():
        missing("the mosquitto binary")
    (tmp_path / "broker").mkdir()
    b = PersistentBroker(tmp_path / "broker", autosave_interval_s=1)
    b.start()
    yield b
    b.stop()


def agent_event_id(device_id: str, manifest_id: str, state: str) -> str:
    from deltafleet.agent.daemon import event_id  # the agent's own rule, not a copy

    return event_id(device_id, manifest_id, state)


@pytest.mark.postgres
def test_no_event_is_lost_and_the_rollout_completes_across_two_broker_sigkills(
        tmp_path: Path, crash_broker: PersistentBroker, pg_url: str) -> None:
    from tests.harness.fleetlab import Lab
    from tests.harness.modelgen import make_onnx_model

    v1 = make_onnx_model(tmp_path / "v1.onnx", size_mb=0.3, seed=3)
    lab = RolloutLab(tmp_path, crash_broker.url, {"v1": v1}, db_url=pg_url)
    procs = Lab(tmp_path / "procs", mqtt_url=crash_broker.url, db_url=pg_url)
    # The server runs as `fleetctl server` does by default (no FLEET_SERVER_ID: a clean MQTT
    # session), so after a broker restart nothing is queued for it until it has re-subscribed.
    procs.env.update(FLEET_HOME=str(lab.cfg.home), FLEET_TOPIC_PREFIX=lab.cfg.topic_prefix)
    procs.env.pop("FLEET_SERVER_ID", None)
    ids = [f"crash-{i:02d}" for i in range(DEVICES)]
    t0 = time.monotonic()
    server = None
    try:
        server = procs.start_server()
        for d in ids:
            procs.start_agent(d, {"hw": "cam"}, trusted_key=lab.cfg.public_key_path,
                              extra_env={"FLEET_AGENT_API_PORT": "0"})
        lab.wait_for(lambda: lab.known_devices() >= set(ids), 90, "20 agents registered")
        lab.group("cams", hw="cam")
        rid = lab.rollout("v1", "cams", canary="4", waves=(50.0, 100.0), health_window_s=2)
        started = time.monotonic() - t0

        def healthy() -> int:
            return lab.status(rid)["counts"].get("healthy", 0)

        def connected_since(t: float) -> set[str]:
            """The agents whose connection.json says connected, written at ``t`` or later."""
            up = set()
            for d in ids:
                try:
                    doc = json.loads((procs.agent_dir(d) / "connection.json").read_text())
                except (OSError, ValueError):
                    continue
                if doc.get("connected") and doc.get("written_at", 0) >= t:
                    up.add(d)
            return up

        # crash 1: the canary is in its trial. The server stalls (a GC pause, a slow host)
        # and comes back only after the devices: what they report on reconnecting (the
        # verdicts reached during the outage) the broker PUBACKs with nobody subscribed.
        lab.wait_for(lambda: lab.status(rid)["counts"].get("trial", 0) >= 2, 60, "canary trial")
        os.kill(server.pid, signal.SIGSTOP)
        crash_broker.kill()
        time.sleep(1.5)  # deliberate: an outage long enough for trials to end without a broker
        restarted = time.time()
        crash_broker.start()
        # the agents reconnect (paho retries every 1-2 s) and report to nobody
        lab.wait_for(lambda: connected_since(restarted) >= set(ids), 60,
                     "every agent to reconnect while the server is stopped")
        os.kill(server.pid, signal.SIGCONT)
        # crash 2: later waves are downloading and reporting
        lab.wait_for(lambda: 4 <= healthy() < DEVICES and lab.status(rid)["current_wave"] >= 1,
                     60, "wave 2 under way")
        crash_broker.kill()
        time.sleep(1.5)  # deliberate: an outage while chunks and reports are in flight
        crash_broker.start()

        data = lab.wait_state(rid, {"completed", "paused", "aborted", "failed"}, 60)
        assert data["state"] == "completed", data
        assert all(t["state"] == "healthy" for t in data["targets"]), data["targets"]
        with lab.store.session() as s:
            manifests = dict(s.execute(select(RolloutTarget.device_id, RolloutTarget.manifest_id)
                                       .where(RolloutTarget.rollout_id == rid)).all())
        assert set(manifests) == set(ids)

        # every outbox drains: each event was acked after the server's commit
        def outboxes() -> dict[str, int]:
            return {d: n for d in ids
                    if (n := len(list((procs.agent_dir(d) / "outbox").glob("*.json"))))}

        lab.wait_for(lambda: not outboxes(), 60, "every outbox to drain")
        with lab.store.session() as s:
            rows = s.execute(select(DeviceEvent.device_id, DeviceEvent.event_id,
                                    DeviceEvent.state)).all()
        by_device: dict[str, list[tuple[str, str]]] = {d: [] for d in ids}
        for device_id, eid, state in rows:
            by_device[device_id].append((eid, state))
        for d in ids:  # exactly the lifecycle of the rollout's manifest, once per event
            expected = sorted((agent_event_id(d, manifests[d], st), st) for st in LIFECYCLE)
            assert sorted(by_device[d]) == expected, (d, by_device[d])
        assert crash_broker.kills == 2
        print(f"{DEVICES} agents: rollout created after {started:.1f} s, completed "
              f"{time.monotonic() - t0 - started:.1f} s later across 2 broker SIGKILLs")
    finally:
        if server is not None and server.poll() is None:
            os.kill(server.pid, signal.SIGCONT)
        procs.close()
        lab.close()


def test_the_server_acks_each_committed_event_and_a_duplicate_again(
        tmp_path: Path, broker) -> None:
    """The ack comes after the commit and names duplicates too: a device whose first ack was
    lost must still be able to clear its outbox."""
    from tests.harness.modelgen import make_onnx_model

    v1 = make_onnx_model(tmp_path / "v1.onnx", size_mb=0.1, seed=4)
    lab = RolloutLab(tmp_path, broker.url, {"v1": v1})
    lab.start_server()
    assert lab.server is not None
    t = Topics(lab.cfg.topic_prefix)
    dev = MqttClient(MqttSettings(broker.url, f"dev-{uuid.uuid4().hex[:6]}"))
    dev.subscribe(t.ack("dev-1"))
    dev.start()
    try:
        dev.wait_connected(10)
        dev.publish_wait(t.ack("dev-1"), b"probe")  # sent behind the SUBSCRIBE: the SUBACK wait
        while dev.inbox.get(timeout=10) != (t.ack("dev-1"), b"probe"):
            pass  # (CONNECTED)
        ev = Event("ev-1", "dev-1", None, None, "detector", "v1", "failed", reason="test")
        acks: list[Ack] = []
        for _ in range(2):
            dev.publish_wait(t.events("dev-1"), encode(ev))
            while True:
                topic, payload = dev.inbox.get(timeout=15)
                if topic == t.ack("dev-1"):
                    acks.append(decode(Ack, payload, max_bytes=MAX_ACK_BYTES))
                    with lab.store.session() as s:  # committed before the ack went out
                        assert s.get(DeviceEvent, "ev-1") is not None
                    break
        assert [a.event_ids for a in acks] == [("ev-1",), ("ev-1",)]
        assert lab.server.stats.duplicate_events == 1
    finally:
        dev.stop()
        lab.close()


def test_a_device_reads_only_its_own_acks_and_cannot_forge_any(secure_fleet) -> None:
    """Generated ACL on a real TLS Mosquitto: dev-a sees its acks, never dev-b's, and cannot
    publish on any ack topic (a forged ack would make a device drop unrecorded events)."""
    from deltafleet.server.config import ServerConfig, mqtt_settings
    from deltafleet.shared.mqtt import Will

    cfg, broker = secure_fleet
    t = Topics(cfg.topic_prefix)
    server = MqttClient(mqtt_settings(ServerConfig(**{**cfg.__dict__, "mqtt_url": broker.url}),
                                      f"fleet-server-{uuid.uuid4().hex[:6]}",
                                      Will(t.server_status(), b"offline")))
    server.start()
    server.wait_connected(10)

    def device(name: str) -> Peer:
        bundle = cfg.home.parent / f"enroll-{name}"
        peer = Peer(broker.port, ca=bundle / "ca.crt", cert=bundle / "client.crt",
                    key=bundle / "client.key")
        assert peer.connect()
        return peer

    a, b = device("dev-a"), device("dev-b")
    try:
        a.subscribe(t.ack("dev-a"))
        a.subscribe(t.ack("dev-b"))
        b.publish(t.ack("dev-a"), encode(Ack("dev-a", ("forged",))))  # dev-b forging for dev-a
        a.publish(t.ack("dev-a"), encode(Ack("dev-a", ("self",))))  # nor for itself
        server.publish_wait(t.ack("dev-b"), encode(Ack("dev-b", ("for-b",))))
        server.publish_wait(t.ack("dev-a"), encode(Ack("dev-a", ("for-a",))))
        got = a.received(1.5)
        assert [(topic, decode(Ack, p).event_ids) for topic, p in got] == [
            (t.ack("dev-a"), ("for-a",))]
    finally:
        a.close()
        b.close()
        server.stop()
