"""A certificate is one identity (issue 11, item 2), against a real Mosquitto running the config
`fleetctl broker config` generates: whatever client id a device sends, the broker names it by
its certificate, so it can take over no other session; it reads nothing of other devices,
through a plain or a ``$share`` subscription; and the servers' share group is a secret."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deltafleet.server import enroll
from deltafleet.server.config import ServerConfig, check_client_identity, mqtt_settings
from deltafleet.server.daemon import FleetServer
from deltafleet.server.errors import UsageError
from deltafleet.server.store import Store, upgrade
from deltafleet.shared import Status, Topics, encode
from deltafleet.shared.mqtt import CONNECTED, DISCONNECTED, MqttClient, Will
from tests.harness.tls_broker import Peer, TlsBroker

QUIET_S = 1.0  # how long "nothing happens" is watched after a positive control arrived
PERSISTENT_S = 3600


def bundle(cfg: ServerConfig, name: str) -> Path:
    return cfg.home.parent / f"enroll-{name}"


def device(broker: TlsBroker, cfg: ServerConfig, name: str, **kw) -> Peer:
    b = bundle(cfg, name)
    return Peer(broker.port, ca=b / "ca.crt", cert=b / "client.crt", key=b / "client.key", **kw)


def connected(peer: Peer) -> Peer:
    assert peer.connect(timeout_s=10), "an enrolled device must be able to connect"
    return peer


def server_client(cfg: ServerConfig, broker: TlsBroker, client_id: str, *,
                  persistent: bool) -> MqttClient:
    settings = mqtt_settings(dataclasses.replace(cfg, mqtt_url=broker.url), client_id,
                             Will(Topics(cfg.topic_prefix).server_status(), b"offline"))
    assert settings.cert_file  # the server identity `fleetctl broker config` made
    return MqttClient(dataclasses.replace(
        settings, session_expiry_s=PERSISTENT_S if persistent else None))


def drain(client: MqttClient, within_s: float) -> list[tuple[str, bytes]]:
    got = []
    deadline = time.monotonic() + within_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            got.append(client.inbox.get(timeout=left))
        except Exception:  # queue.Empty
            break
    return got


def wait_payload(client: MqttClient, topic: str, payload: bytes, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            t, p = client.inbox.get(timeout=left)
        except Exception:  # queue.Empty
            break
        if (t, p) == (topic, payload):
            return
    raise AssertionError(f"{payload!r} on {topic} did not arrive within {timeout_s} s")


def queue_for_the_server_away(cfg: ServerConfig, broker: TlsBroker, payload: bytes) -> None:
    """The server's persistent session subscribes to events and goes away; dev-b then sends
    ``payload``, which the broker must queue in that session."""
    t = Topics(cfg.topic_prefix)
    first = server_client(cfg, broker, cfg.server_identity, persistent=True)
    first.subscribe(t.all_devices("events"))
    first.start()
    first.wait_connected(15)
    first.stop()
    b = connected(device(broker, cfg, "dev-b"))
    try:
        b.publish(t.events("dev-b"), payload)
    finally:
        b.close()


def receive_as_the_server_again(cfg: ServerConfig, broker: TlsBroker, payload: bytes) -> None:
    """The server reconnects to its persistent session, subscribing to nothing, and gets
    ``payload`` from dev-b."""
    t = Topics(cfg.topic_prefix)
    again = server_client(cfg, broker, cfg.server_identity, persistent=True)
    again.start()
    try:
        again.wait_connected(15)
        wait_payload(again, t.events("dev-b"), payload)
    finally:
        again.stop()


@pytest.fixture
def fleet(secure_fleet) -> tuple[ServerConfig, TlsBroker]:
    return secure_fleet


def test_generated_config_binds_the_client_id_to_the_certificate_and_persists_sessions(
        fleet) -> None:
    cfg, broker = fleet
    conf = broker.files.conf.read_text().splitlines()
    assert "use_identity_as_username true" in conf
    assert "use_username_as_clientid true" in conf
    assert "persistence true" in conf and "autosave_interval 1" in conf
    location = next(ln.split(" ", 1)[1] for ln in conf if ln.startswith("persistence_location"))
    assert Path(location) == broker.files.conf.parent / "persistence"


def test_a_device_claiming_another_devices_client_id_neither_kicks_it_nor_takes_its_session(
        fleet) -> None:
    cfg, broker = fleet
    t = Topics(cfg.topic_prefix)
    server = server_client(cfg, broker, f"fleet-server-{uuid.uuid4().hex[:6]}", persistent=False)
    server.start()
    server.wait_connected(15)
    b = connected(device(broker, cfg, "dev-b", client_id="dev-b", clean_session=False))
    try:
        b.subscribe(t.desired_filter("dev-b"))
        for claimed in ("dev-b", "fleet-agent-dev-b", "dev-b", "dev-b"):  # in a loop
            attacker = device(broker, cfg, "dev-a", client_id=claimed, clean_session=True)
            attacker.connect(timeout_s=10)  # accepted, but as dev-a
            attacker.close()
        server.publish_wait(t.desired("dev-b", "det"), b"for-b-online")
        assert b.wait_for(t.desired("dev-b", "det"), 15) == b"for-b-online"
        assert not b.disconnected.is_set(), "dev-a's certificate took over dev-b's connection"
        # dev-b's persistent session still holds its subscription and queues while it is away
        b.close()
        server.publish_wait(t.desired("dev-b", "det"), b"for-b-away")
        for _ in range(3):
            attacker = device(broker, cfg, "dev-a", client_id="dev-b", clean_session=True)
            attacker.connect(timeout_s=10)
            attacker.close()
        back = connected(device(broker, cfg, "dev-b", client_id="dev-b", clean_session=False))
        try:
            assert back.session_present, "dev-b's session was wiped by dev-a's clean connect"
            assert back.wait_for(t.desired("dev-b", "det"), 15) == b"for-b-away"
        finally:
            back.close()
    finally:
        b.close()
        server.stop()


def test_a_device_claiming_the_servers_client_id_does_not_disconnect_the_server(fleet) -> None:
    cfg, broker = fleet
    t = Topics(cfg.topic_prefix)
    server = server_client(cfg, broker, cfg.server_identity, persistent=True)
    check_client_identity(server.settings)  # what FleetServer does with FLEET_SERVER_ID set
    server.subscribe(t.all_devices("hello"))
    server.start()
    server.wait_connected(15)
    assert server.inbox.get(timeout=5)[0] == CONNECTED
    try:
        for _ in range(5):
            attacker = device(broker, cfg, "dev-a", client_id=cfg.server_identity)
            attacker.connect(timeout_s=10)
            attacker.publish(t.hello("dev-b"), b"spoofed")  # it is still dev-a to the ACL
            attacker.close()
        a = connected(device(broker, cfg, "dev-a"))
        try:
            a.publish(t.hello("dev-a"), b"genuine")
            wait_payload(server, t.hello("dev-a"), b"genuine")
        finally:
            a.close()
        assert server.connected.is_set()
        assert all(topic not in (DISCONNECTED, CONNECTED) for topic, _ in drain(server, QUIET_S)), \
            "the server was disconnected (its session taken over)"
    finally:
        server.stop()


def test_the_servers_persistent_session_is_its_certificate_identity_and_survives_a_reconnect(
        fleet) -> None:
    cfg, broker = fleet
    queue_for_the_server_away(cfg, broker, b"while-the-server-is-away")
    receive_as_the_server_again(cfg, broker, b"while-the-server-is-away")


def test_a_replica_whose_server_id_is_not_its_certificate_identity_is_refused(fleet) -> None:
    cfg, broker = fleet
    settings = mqtt_settings(dataclasses.replace(cfg, mqtt_url=broker.url), "fleet-server-b",
                             None)
    with pytest.raises(UsageError, match="--server-id fleet-server-b"):
        check_client_identity(settings)
    enroll.ensure_server_identity(cfg, "fleet-server-b")  # `broker config --server-id`
    replica = ServerConfig.from_env({"FLEET_HOME": str(cfg.home), "FLEET_MQTT_URL": broker.url,
                                     "FLEET_SERVER_ID": "fleet-server-b"})
    check_client_identity(mqtt_settings(replica, "fleet-server-b", None))
    assert "user fleet-server-b" in enroll.render_acl(cfg.topic_prefix,
                                                      enroll.server_identities(cfg))
    with pytest.raises(UsageError, match="server's MQTT identity"):
        enroll.enroll_device(cfg, "fleet-server-b", cfg.home.parent / "enroll-clash")


@pytest.fixture
def fleet_server(fleet, tmp_path: Path) -> Iterator[FleetServer]:
    """The real server, run from ServerConfig.from_env with the secret share group made by
    `fleetctl broker config` in $FLEET_HOME/share-group."""
    cfg, broker = fleet
    group = enroll.ensure_share_group(cfg)
    db_url = f"sqlite:///{tmp_path}/fleet.db"
    upgrade(db_url)
    srv_cfg = ServerConfig.from_env({"FLEET_HOME": str(cfg.home), "FLEET_MQTT_URL": broker.url,
                                     "FLEET_DB_URL": db_url,
                                     "FLEET_SERVER_ID": cfg.server_identity})
    assert srv_cfg.share_group == group and len(group) >= 16
    srv = FleetServer(srv_cfg, Store(db_url))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    srv.mqtt.wait_connected(15)
    yield srv
    srv.stop_event.set()
    thread.join(15)


def test_a_device_subscribing_to_shared_groups_or_other_prefixes_gets_nothing_and_takes_nothing(
        fleet, fleet_server) -> None:
    cfg, broker = fleet
    t = Topics(cfg.topic_prefix)
    a = connected(device(broker, cfg, "dev-a"))
    b = connected(device(broker, cfg, "dev-b"))
    try:
        for group in ("deltafleet", "replicas", "fleet", "server", "bench"):  # guessable names
            for leaf in ("events", "status", "+"):
                a.subscribe(f"$share/{group}/{t.all_devices(leaf)}")
        a.subscribe(f"{cfg.topic_prefix}/dev/dev-b/#")  # another device's prefix
        a.subscribe(t.all_devices("events"))
        before = fleet_server.stats.messages
        sent = 40
        for i in range(sent):
            leaf = "status" if i % 2 else "events"
            b.publish(t.dev("dev-b", leaf), encode(Status("dev-b", bool(i % 4))))
        deadline = time.monotonic() + 30
        while fleet_server.stats.messages - before < sent and time.monotonic() < deadline:
            time.sleep(0.05)  # poll pacing: the server's counter has no event to wait on
        assert fleet_server.stats.messages - before == sent, "the server lost device messages"
        assert a.received(QUIET_S) == [], "dev-a read dev-b's messages"
        assert fleet_server.mqtt.connected.is_set()
    finally:
        a.close()
        b.close()


def test_a_guessable_share_group_is_refused(tmp_path: Path) -> None:
    for group in ("deltafleet", "replicas", "x" * 15):
        with pytest.raises(UsageError, match="guessable"):
            ServerConfig.from_env({"FLEET_HOME": str(tmp_path), "FLEET_SHARE_GROUP": group})
    with pytest.raises(UsageError, match="only letters"):
        ServerConfig.from_env({"FLEET_HOME": str(tmp_path), "FLEET_SHARE_GROUP": "a/b" * 8})
    secret = "k3Jx-9vQ_2mW8pLt5Rz"
    cfg = ServerConfig.from_env({"FLEET_HOME": str(tmp_path), "FLEET_SHARE_GROUP": secret})
    assert cfg.share_group == secret


def test_the_servers_queued_messages_survive_a_broker_sigkill(fleet) -> None:
    """The generated config saves sessions every second: a kill -9 of the broker keeps the
    server's persistent session and the device messages queued in it."""
    cfg, broker = fleet
    queue_for_the_server_away(cfg, broker, b"queued-before-the-crash")
    saved_after = time.time()
    db = broker.files.conf.parent / "persistence" / "mosquitto.db"
    deadline = time.monotonic() + 20
    while not (db.exists() and db.stat().st_mtime > saved_after) and time.monotonic() < deadline:
        time.sleep(0.1)  # waits for the broker's next autosave, not a fixed time
    assert db.exists() and db.stat().st_mtime > saved_after, "no autosave within 20 s"
    broker.kill()  # SIGKILL: nothing saved on the way out
    broker.start()  # the same config, port and persistence directory
    receive_as_the_server_again(cfg, broker, b"queued-before-the-crash")
