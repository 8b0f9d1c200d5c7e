"""A real fleet-agent process with a pinned root of trust, against a real Mosquitto, driven by
a scripted server peer: rotations are followed and persisted, hostile manifests and patches
are refused, and the device stays on its model throughout."""

from __future__ import annotations

import bz2
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from deltafleet.server import enroll, keys
from deltafleet.server.config import ServerConfig, mqtt_settings
from deltafleet.shared import (
    KeyList,
    RootMetadata,
    SigningKey,
    Status,
    Topics,
    TrustBundle,
    canonical_json,
    decode,
    sha256_file,
    sign_payload,
)
from deltafleet.shared.mqtt import MqttClient
from tests.harness.fleetlab import wait_for
from tests.harness.mqtt_peer import Peer

pytestmark = pytest.mark.broker
BIN = Path(sys.executable).parent
HW = "hw-test-1"


def root_env(version: int, key: SigningKey, *signers: SigningKey) -> dict:
    return sign_payload(RootMetadata(version, {key.keyid: key.public_key}).to_wire(),
                        list(signers))


def keylist_env(version: int, online: SigningKey, *signers: SigningKey) -> dict:
    now = int(time.time())
    return sign_payload(KeyList(version, now - 60, now + 3600,
                                {online.keyid: online.public_key}).to_wire(), list(signers))


class Device:
    """One enrolled agent: root.json + trust.json + agent.toml, run as `fleet-agent run`."""

    def __init__(self, lab, root1: dict, bundle: bytes, device_id: str = "dev-1") -> None:
        self.lab, self.id = lab, device_id
        etc = lab.root / f"etc-{device_id}"
        etc.mkdir(parents=True)
        (etc / "root.json").write_bytes(canonical_json(root1))
        (etc / "trust.json").write_bytes(bundle)
        self.config = etc / "agent.toml"
        self.config.write_text(
            f'device_id = "{device_id}"\nbroker_url = "{lab.mqtt_url}"\n'
            f'state_dir = "{lab.agent_dir(device_id)}"\nhardware_id = "{HW}"\n'
            f'root_of_trust = "{etc / "root.json"}"\ntrust_bundle = "{etc / "trust.json"}"\n'
            "api_port = 0\nheartbeat_s = 0.5\n")

    def start(self):
        return self.lab._spawn(f"agent-{self.id}", [str(BIN / "fleet-agent"), "run", "--config",
                                                    str(self.config)])

    def stop(self) -> None:
        self.lab.stop(f"agent-{self.id}")

    def version(self) -> str | None:
        status = self.lab.agent_status(self.id)
        return status[0]["version"] if status else None

    def trust_state(self) -> dict:
        path = self.lab.agent_dir(self.id) / "trust-state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def wait_keylist(self, version: int, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            kl = self.trust_state().get("keylist") or {}
            if kl.get("payload", {}).get("version") == version:
                return
            time.sleep(0.05)  # poll pacing: the agent's file write has no event to wait on
        raise TimeoutError(f"device did not persist key list v{version}")


def refused(peer: Peer, why: str = "signature") -> list:
    return [e for e in peer.events if e.state == "rejected" and why in e.reason]


@pytest.fixture
def lab(fresh_lab):
    """Every test here gets a broker of its own."""
    return fresh_lab


def test_agent_follows_key_and_root_rotation_and_refuses_the_old_online_key(lab, models):
    v1, v2 = models
    r1, r2, k1, k2, k3 = (SigningKey.generate() for _ in range(5))
    root1 = root_env(1, r1, r1)
    dev = Device(lab, root1, TrustBundle((root1,), keylist_env(1, k1, r1)).to_bytes())
    peer = Peer(lab.mqtt_url, k1)
    try:
        dev.start()
        peer.offer(dev.id, "detector", "v1", v1, serial=1, hardware_id=HW)
        assert peer.wait_event(lambda e: e.state in ("healthy", "rejected"), 60).state == "healthy"

        # Online key rotation: key list v2 names only k2.
        peer.publish_trust(TrustBundle((root1,), keylist_env(2, k2, r1)).to_bytes())
        dev.wait_keylist(2)
        peer.offer(dev.id, "detector", "v2", v2, serial=2, key=k1)
        ev = peer.wait_event(lambda e: e.state == "rejected", 30)
        assert "signature" in ev.reason and ev.sha256 == sha256_file(v1)
        assert dev.version() == "v1"
        m = peer.offer(dev.id, "detector", "v2", v2, serial=3, key=k2)
        ev = peer.wait_event(lambda e: e.manifest_id == m.manifest_id and e.state == "healthy", 60)

        # Root rotation: root v2 signed by r1 and r2; key list v3 (k3) signed by the new root.
        root2 = root_env(2, r2, r1, r2)
        peer.publish_trust(TrustBundle((root1, root2), keylist_env(3, k3, r2)).to_bytes())
        dev.wait_keylist(3)
        assert len(dev.trust_state()["roots"]) == 2
        m = peer.offer(dev.id, "detector", "v1", v1, serial=4, key=k3)  # back = higher serial
        peer.wait_event(lambda e: e.manifest_id == m.manifest_id and e.state == "healthy", 60)
        assert dev.version() == "v1"

        # A root signed only by itself (not by root v2) is refused; the state stays.
        r3 = SigningKey.generate()
        forged = root_env(3, r3, r3)
        peer.publish_trust(TrustBundle((root1, root2, forged), keylist_env(4, k1, r3)).to_bytes())

        # Restart: the rotations were persisted; the retired keys stay refused.
        dev.stop()
        dev.start()
        for serial, key in ((5, k2), (6, k1)):
            before = len(refused(peer))
            peer.offer(dev.id, "detector", "v2", v2, serial=serial, key=key)
            peer.wait_event(lambda e, n=before: len(refused(peer)) > n, 30)
        state = dev.trust_state()
        assert state["keylist"]["payload"]["version"] == 3 and len(state["roots"]) == 2
        assert dev.version() == "v1"
        m = peer.offer(dev.id, "detector", "v2", v2, serial=7, key=k3)
        peer.wait_event(lambda e: e.manifest_id == m.manifest_id and e.state == "healthy", 60)
        assert dev.version() == "v2"
    finally:
        peer.close()


def bz2_bomb_patch(new_size: int) -> bytes:
    """BSDIFF40 whose diff block (~100 bytes) expands to 64 MiB; header says ``new_size``."""
    def int64(n: int) -> bytes:
        return n.to_bytes(8, "little")

    ctrl = bz2.compress(int64(new_size) + int64(0) + int64(0))
    diff = bz2.compress(b"\0" * (64 << 20))
    extra = bz2.compress(b"")
    return b"BSDIFF40" + int64(len(ctrl)) + int64(len(diff)) + int64(new_size) + ctrl + diff + extra


def test_hostile_manifests_and_patches_leave_the_device_on_its_model(lab, models, tmp_path):
    v1, v2 = models
    r1, k1 = SigningKey.generate(), SigningKey.generate()
    root1 = root_env(1, r1, r1)
    dev = Device(lab, root1, TrustBundle((root1,), keylist_env(1, k1, r1)).to_bytes())
    peer = Peer(lab.mqtt_url, k1)
    try:
        dev.start()
        first = peer.offer(dev.id, "detector", "v1", v1, serial=1, hardware_id=HW)
        peer.wait_event(lambda e: e.manifest_id == first.manifest_id and e.state == "healthy", 60)
        m2 = peer.offer(dev.id, "detector", "v2", v2, serial=2)
        peer.wait_event(lambda e: e.manifest_id == m2.manifest_id and e.state == "healthy", 60)
        fetched = len(peer.requests)

        def refused_with(why: str, publish) -> None:
            before = len(refused(peer, why))
            publish()
            peer.wait_event(lambda e: len(refused(peer, why)) > before, 30)
            assert dev.version() == "v2"

        # Replay of the older, still valid and correctly signed manifest of v1.
        refused_with("replayed", lambda: peer.publish_manifest(
            dev.id, "detector", peer.signed[first.manifest_id]))
        # Tampered: a signed v1 manifest whose payload was edited after signing.
        env = json.loads(peer.signed[first.manifest_id])
        env["payload"]["serial"] = 99
        refused_with("signature", lambda: peer.publish_manifest(
            dev.id, "detector", canonical_json(env)))
        refused_with("expired", lambda: peer.offer(dev.id, "detector", "v1", v1, serial=3,
                                                   expires_at=int(time.time()) - 5))
        refused_with("device dev-2", lambda: peer.offer("dev-2", "detector", "v1", v1,
                                                        serial=4, publish_to=dev.id))
        refused_with("hardware", lambda: peer.offer(dev.id, "detector", "v1", v1, serial=5,
                                                    hardware_id="hw-another-board"))
        assert len(peer.requests) == fetched  # nothing was downloaded for any of them

        # A bz2 bomb inside a bsdiff patch, correctly signed and hashed: refused in the child.
        target = tmp_path / "v3.onnx"
        target.write_bytes(v2.read_bytes()[:-16] + b"\x01" * 16)
        bomb = tmp_path / "bomb.bsdiff"
        bomb.write_bytes(bz2_bomb_patch(target.stat().st_size))
        m = peer.offer(dev.id, "detector", "v3", target, serial=6, artifact=bomb,
                       base_sha256=sha256_file(v2))
        ev = peer.wait_event(lambda e: e.manifest_id == m.manifest_id
                             and e.state in ("failed", "healthy"), 30)
        assert ev.state == "failed" and "bz2 bomb" in ev.reason, ev.reason
        assert ev.sha256 == sha256_file(v2) and dev.version() == "v2"

        # The device still takes a good update afterwards, and kept its heartbeat going.
        m = peer.offer(dev.id, "detector", "v1", v1, serial=7)
        peer.wait_event(lambda e: e.manifest_id == m.manifest_id and e.state == "healthy", 60)
        assert dev.version() == "v1"
        online = [p for t, p in peer.statuses if t.endswith(f"/{dev.id}/status")
                  and b'"online":true' in p]
        assert len(online) >= 2  # connect + at least one heartbeat (heartbeat_s = 0.5)
    finally:
        peer.close()


def test_agent_runs_from_its_enrollment_bundle_over_tls(secure_fleet, tmp_path):
    """`fleetctl device enroll` output as written: mqtts with the client certificate, the
    pinned root, and the server's retained trust bundle followed."""
    cfg, broker = secure_fleet
    bundle = tmp_path / "enroll-dev-t"
    enroll.enroll_device(cfg, "dev-t", bundle, broker_url=broker.url, install_dir=str(bundle))
    keys.rotate_online_key(cfg)  # the device learns key list v2 from the broker, not the bundle
    server = MqttClient(mqtt_settings(ServerConfig(**{**cfg.__dict__, "mqtt_url": broker.url}),
                                      f"fleet-server-{uuid.uuid4().hex[:6]}", None))
    topics = Topics(cfg.topic_prefix)
    server.subscribe(topics.status("dev-t"))
    server.start()
    server.wait_connected(10)
    for topic, payload in keys.trust_publications(cfg):
        server.publish_wait(topic, payload, retain=True)
    state = tmp_path / "state"
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115
    agent = subprocess.Popen([str(BIN / "fleet-agent"), "run", "--config",
                              str(bundle / "agent.toml"), "--state-dir", str(state),
                              "--api-port", "0"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        online = False
        while time.monotonic() < deadline and not online:
            try:
                topic, payload = server.inbox.get(timeout=0.5)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
            online = topic == topics.status("dev-t") and decode(Status, payload).online
        assert online, (tmp_path / "agent.log").read_text()[-2000:]
        def keylist_version() -> int | None:
            path = state / "trust-state.json"
            st = json.loads(path.read_text()) if path.exists() else {}
            return ((st.get("keylist") or {}).get("payload") or {}).get("version")

        wait_for(lambda: keylist_version() == 2, 10, "the agent to persist key list v2")
    finally:
        agent.terminate()
        agent.wait(10)
        log.close()
        server.stop()
