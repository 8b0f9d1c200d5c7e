"""A real fleet-agent process against a real Mosquitto, driven by a scripted server peer."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltafleet.shared import SigningKey, sha256_file
from tests.harness.mqtt_peer import CHUNK, Peer

pytestmark = pytest.mark.broker


@pytest.fixture
def lab(fresh_lab):
    """Every test here gets a broker of its own."""
    return fresh_lab


def start(lab, key_path: Path, device_id: str = "dev-1", **env: str):
    return lab.start_agent(device_id, {"hw": "test"}, trusted_key=key_path,
                           extra_env={k: str(v) for k, v in env.items()})


def test_tampered_chunk_is_refetched_and_the_update_still_succeeds(lab, key, models):
    signing, pub = key
    v1, _ = models
    peer = Peer(lab.mqtt_url, signing)
    try:
        tampered: set[int] = set()

        def tamper_once(index: int, data: bytes) -> bytes | None:
            if index == 3 and index not in tampered:
                tampered.add(index)
                return b"\x00" * len(data)
            return None

        peer.tamper = tamper_once
        start(lab, pub)
        m = peer.offer("dev-1", "detector", "v1", v1, serial=1)
        ev = peer.wait_event(lambda e: e.state in ("healthy", "failed"), 60)
        assert ev.state == "healthy", ev.reason
        assert ev.sha256 == m.target_sha256
        assert [i for _, i in peer.requests].count(3) == 2  # asked again after the bad copy
        assert lab.agent_status("dev-1")[0]["sha256"] == sha256_file(v1)
    finally:
        peer.close()


def test_manifest_signed_by_another_key_is_refused_and_the_device_keeps_its_model(lab, key, models):
    signing, pub = key
    v1, v2 = models
    peer = Peer(lab.mqtt_url, signing)
    try:
        start(lab, pub)
        peer.offer("dev-1", "detector", "v1", v1, serial=1)
        peer.wait_event(lambda e: e.state == "healthy", 60)
        peer.offer("dev-1", "detector", "v2", v2, serial=2, key=SigningKey.generate())
        ev = peer.wait_event(lambda e: e.state == "rejected", 30)
        assert "signature" in ev.reason
        assert ev.sha256 == sha256_file(v1)
        assert lab.agent_status("dev-1")[0]["version"] == "v1"
        assert not [r for r in peer.requests if r[0] == sha256_file(v2)]  # nothing fetched
    finally:
        peer.close()


def test_agent_restarted_mid_download_resumes_without_refetching_completed_chunks(lab, key, models):
    signing, pub = key
    v1, _ = models
    total = -(-v1.stat().st_size // CHUNK)
    peer = Peer(lab.mqtt_url, signing)
    try:
        crashing = start(lab, pub, FLEET_AGENT_CRASH_AFTER_CHUNKS=5)
        peer.offer("dev-1", "detector", "v1", v1, serial=1)
        assert crashing.wait(60) == 137
        on_disk = {int(p.name) for p in (lab.agent_dir("dev-1") / "downloads").glob("*/*")}
        assert len(on_disk) == 5
        first_round = len(peer.requests)
        start(lab, pub)
        ev = peer.wait_event(lambda e: e.state == "trial", 60)
        assert ev.chunks_reused == 5
        asked_after_restart = {i for _, i in peer.requests[first_round:]}
        assert asked_after_restart == set(range(total)) - on_disk
        assert lab.agent_status("dev-1")[0]["sha256"] == sha256_file(v1)
    finally:
        peer.close()
