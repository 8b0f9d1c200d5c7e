"""Per-device MQTT identity against a real Mosquitto running the config `fleetctl broker
config` generates: TLS client certificates (CN = device id), CRL, ACL."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deltafleet.server import enroll, keys
from deltafleet.server.config import ServerConfig, mqtt_settings
from deltafleet.server.pki import create_ca, issue_cert
from deltafleet.shared import Topics, TrustStore, trust_topic
from deltafleet.shared.mqtt import MqttClient, Will
from tests.harness.tls_broker import Peer

QUIET_S = 0.7  # how long "receives nothing" is watched after a positive control arrived


@pytest.fixture
def server(secure_fleet) -> Iterator[MqttClient]:
    cfg, broker = secure_fleet
    settings = mqtt_settings(
        ServerConfig(**{**cfg.__dict__, "mqtt_url": broker.url}),
        f"fleet-server-{uuid.uuid4().hex[:6]}",
        Will(Topics(cfg.topic_prefix).server_status(), b"offline"))
    assert settings.cert_file and settings.ca_file  # defaults from $FLEET_HOME/pki
    client = MqttClient(settings)
    client.start()
    client.wait_connected(10)
    yield client
    client.stop()


def device(secure_fleet, name: str) -> Peer:
    cfg, broker = secure_fleet
    bundle = cfg.home.parent / f"enroll-{name}"
    return Peer(broker.port, ca=bundle / "ca.crt", cert=bundle / "client.crt",
                key=bundle / "client.key")


def connected(peer: Peer) -> Peer:
    assert peer.connect(), "an enrolled device must be able to connect"
    return peer


def test_device_cannot_read_another_devices_desired_state(secure_fleet, server) -> None:
    t = Topics(secure_fleet[0].topic_prefix)
    a, b = connected(device(secure_fleet, "dev-a")), connected(device(secure_fleet, "dev-b"))
    try:
        a.subscribe(t.desired_filter("dev-b"))
        a.subscribe("#")
        b.subscribe(t.desired_filter("dev-b"))
        server.publish_wait(t.desired("dev-b", "det"), b"manifest-for-b", retain=True)
        assert b.wait_for(t.desired("dev-b", "det")) == b"manifest-for-b"  # control
        assert a.received(QUIET_S) == []
    finally:
        a.close()
        b.close()


def test_device_cannot_publish_as_another_device(secure_fleet, server) -> None:
    t = Topics(secure_fleet[0].topic_prefix)
    for leaf in ("hello", "status", "events", "chunkreq"):
        server.subscribe(t.all_devices(leaf))
    server.subscribe(t.all_devices("desired/+"))
    a = connected(device(secure_fleet, "dev-a"))
    try:
        for leaf in ("hello", "status", "events", "chunkreq"):
            a.publish(t.dev("dev-b", leaf), b"spoofed")
        a.publish(t.desired("dev-b", "det"), b"forged manifest")
        a.publish(t.desired("dev-a", "det"), b"self-issued manifest")
        a.publish(t.hello("dev-a"), b"genuine")  # control: after the spoofs, same connection
        got = []
        while True:
            topic, payload = server.inbox.get(timeout=5)
            if topic.startswith("$"):
                continue
            got.append((topic, payload))
            if payload == b"genuine":
                break
        assert got == [(t.hello("dev-a"), b"genuine")]
    finally:
        a.close()


def test_only_the_server_may_publish_chunks_trust_and_presence(secure_fleet, server) -> None:
    cfg = secure_fleet[0]
    t = Topics(cfg.topic_prefix)
    a, b = connected(device(secure_fleet, "dev-a")), connected(device(secure_fleet, "dev-b"))
    try:
        b.subscribe(t.chunk_filter("0" * 64))
        b.subscribe(trust_topic(cfg.topic_prefix))
        b.subscribe(t.server_status())
        a.publish(t.chunk("0" * 64, 0), b"evil chunk")
        a.publish(trust_topic(cfg.topic_prefix), b"evil trust", retain=True)
        a.publish(t.server_status(), b"online", retain=True)
        server.publish_wait(t.chunk("0" * 64, 1), b"good chunk")
        assert b.wait_for(t.chunk("0" * 64, 1)) == b"good chunk"
        assert b.received(QUIET_S) == []
    finally:
        a.close()
        b.close()


def test_devices_cannot_overwrite_or_clear_retained_chunks(secure_fleet, server) -> None:
    """Chunks are retained on the broker (delivery.chunks): a device's retained publish, or an
    empty retained "clear", on art/# is dropped; a later subscriber gets the server's chunks."""
    t = Topics(secure_fleet[0].topic_prefix)
    sha = "1" * 64
    server.publish_wait(t.chunk(sha, 0), b"good chunk 0", retain=True)
    server.publish_wait(t.chunk(sha, 1), b"good chunk 1", retain=True)
    a = connected(device(secure_fleet, "dev-a"))
    try:
        a.publish(t.chunk(sha, 0), b"evil chunk", retain=True)
        a.publish(t.chunk(sha, 1), b"", retain=True)
        a.publish(t.chunk(sha, 2), b"evil extra chunk", retain=True)
    finally:
        a.close()
    b = connected(device(secure_fleet, "dev-b"))
    try:
        b.subscribe(t.chunk_filter(sha))
        got = sorted(b.received(2 * QUIET_S))
        assert got == [(t.chunk(sha, 0), b"good chunk 0"), (t.chunk(sha, 1), b"good chunk 1")]
    finally:
        b.close()
    for i in (0, 1):
        server.publish_wait(t.chunk(sha, i), b"", retain=True)


def test_device_receives_the_trust_bundle_and_follows_a_key_rotation(
        secure_fleet, server) -> None:
    cfg = secure_fleet[0]
    pinned = TrustStore.pin((cfg.home.parent / "enroll-dev-a" / "root.json").read_bytes())
    old_key = keys.online_signing_key(cfg)
    keys.rotate_online_key(cfg)
    for topic, payload in keys.trust_publications(cfg):
        server.publish_wait(topic, payload, retain=True)
    a = connected(device(secure_fleet, "dev-a"))
    try:
        a.subscribe(f"{cfg.topic_prefix}/trust/#")
        pinned.apply_bundle(a.wait_for(trust_topic(cfg.topic_prefix)), int(time.time()))
    finally:
        a.close()
    assert pinned.keylist is not None and pinned.keylist.version == 2
    assert old_key.keyid not in pinned.keylist.keys


def test_client_without_a_certificate_cannot_connect(secure_fleet) -> None:
    cfg, broker = secure_fleet
    peer = Peer(broker.port, ca=cfg.pki_dir / "ca.crt")
    assert not peer.connect(timeout_s=3)


def test_revoked_certificate_cannot_connect(secure_fleet) -> None:
    assert enroll.is_revoked(secure_fleet[0], "dev-r")
    assert not device(secure_fleet, "dev-r").connect(timeout_s=3)


def test_certificate_from_another_ca_cannot_connect(secure_fleet, tmp_path: Path) -> None:
    cfg, broker = secure_fleet
    rogue = issue_cert(create_ca("rogue"), "dev-a")
    (tmp_path / "rogue.crt").write_bytes(rogue.cert_pem)
    (tmp_path / "rogue.key").write_bytes(rogue.key_pem)
    peer = Peer(broker.port, ca=cfg.pki_dir / "ca.crt", cert=tmp_path / "rogue.crt",
                key=tmp_path / "rogue.key")
    assert not peer.connect(timeout_s=3)


def test_anonymous_plain_tcp_client_gets_nothing(secure_fleet, server) -> None:
    cfg, broker = secure_fleet
    server.publish_wait(Topics(cfg.topic_prefix).server_status(), b"online", retain=True)
    peer = Peer(broker.port, ca=None, tls=False)
    assert not peer.connect(timeout_s=3)
    assert peer.received(0.2) == []


def test_generated_acl_confines_devices_and_grants_anonymous_nothing(tmp_path: Path) -> None:
    acl = enroll.render_acl("deltafleet/v1", "fleet-server")
    lines = [ln for ln in acl.splitlines() if ln and not ln.startswith("#")]
    assert lines[:2] == ["user fleet-server", "topic readwrite deltafleet/v1/#"]
    assert all(ln.startswith("pattern") for ln in lines[2:])
    assert all("%u" in ln for ln in lines[2:] if ln.startswith("pattern write"))
    assert not any(ln.startswith("topic") for ln in lines[2:])  # no rule for anonymous/all
