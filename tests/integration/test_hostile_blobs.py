"""A corrupt blob in the server's own store is never shipped: the real `fleetctl server`, a real
fleet-agent process and a real Mosquitto; a watcher on the chunk topics hashes everything the
server publishes. The target is held with a server-side reason (no device failure, no retry
used), `fleetctl store verify` names the blob and what depends on it, `--repair` fixes it and
the rollout then completes by itself."""

from __future__ import annotations

import json
import queue
import re
import uuid
from pathlib import Path

import pytest

from deltafleet.shared import Topics, chunk_hashes_file, sha256_bytes, sha256_file
from tests.harness.background import Background
from tests.harness.mqtt_peer import subscribed_client

pytestmark = pytest.mark.broker

CHUNK = 65536  # ServerConfig.chunk_size_bytes default


class ChunkWatcher(Background):
    """Subscribes to every artifact chunk topic of the prefix and records what goes out."""

    def __init__(self, broker_url: str, prefix: str) -> None:
        self.topics = Topics(prefix)
        self.seen: list[tuple[str, int, bytes]] = []
        self.client = subscribed_client(broker_url, "watch", f"{prefix}/art/#")
        self.start()

    def step(self) -> None:
        try:
            topic, payload = self.client.inbox.get(timeout=0.2)
        except queue.Empty:
            return
        if "/art/" in topic:
            sha, index = self.topics.parse_chunk(topic)
            self.seen.append((sha, index, payload))

    def close(self) -> None:
        self.stop()
        self.client.stop()


@pytest.fixture
def lab(lab):
    """The shared Lab, on a topic prefix of the test's own."""
    lab.env["FLEET_TOPIC_PREFIX"] = f"blobs{uuid.uuid4().hex[:6]}/v1"
    return lab


def overwrite_7_bytes(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        old = f.read(7)
        f.seek(-7, 1)
        f.write(bytes(b ^ 0x5A for b in old))


def target(lab, rid: int) -> dict:
    (t,) = lab.fleetctl_json("rollout", "status", str(rid))["targets"]
    return t


def test_a_corrupt_model_blob_is_never_published_held_server_side_and_repair_resumes(lab,
                                                                                    tmp_path):
    from tests.harness.fleetlab import wait_for
    from tests.harness.modelgen import make_incompressible_onnx_model

    model = make_incompressible_onnx_model(tmp_path / "noise.onnx", size_mb=0.4)
    sha = sha256_file(model)
    lab.fleetctl("init")
    lab.fleetctl("model", "add", "detector", "v1", str(model))  # ships as it is (incompressible)
    lab.fleetctl("group", "create", "cams", "--match", "hw=cam")
    blob = lab.home / "blobs" / sha[:2] / sha
    overwrite_7_bytes(blob)
    watcher = ChunkWatcher(lab.mqtt_url, lab.env["FLEET_TOPIC_PREFIX"])
    try:
        lab.start_server()
        lab.start_agent("cam-1", {"hw": "cam"})
        wait_for(lambda: "cam-1" in lab.online_devices(), 60, "agent online")
        rid = lab.fleetctl_json("rollout", "model", "detector:v1", "--group", "cams",
                                "--health-window", "1s", "--max-failure", "0%",
                                "--retry-backoff", "1s")["id"]
        held = f"held: server blob {sha[:12]} corrupt (store)"
        wait_for(lambda: target(lab, rid)["reason"] == held, 60, "target held server-side")
        # the server logs the corruption once, naming the blob and what depends on it
        wait_for(lambda: re.search(rf"server blob {sha} is corrupt.*detector:v1/default "
                                   rf"\(model file\).*rollout {rid} \(running",
                                   lab.log("server")), 30, "the corruption logged")

        # a few more reconcile ticks: still held, no attempt used, rollout not paused
        status = lab.fleetctl_json("rollout", "status", str(rid))
        assert status["state"] == "running", status["state_reason"]
        t = target(lab, rid)
        assert (t["state"], t["attempts"], t["reason"]) == ("pending", 0, held)
        assert watcher.seen == []  # nothing of the corrupt blob (nor anything else) went out
        assert lab.log("server").count(f"server blob {sha} is corrupt") == 1

        # fleetctl store verify finds it: exit 1, names the dependents
        res = lab.fleetctl("store", "verify", "--json", check=False)
        assert res.returncode == 1, res.stderr
        (bad,) = json.loads(res.stdout)["blobs"]
        assert (bad["sha256"], bad["kind"], bad["status"]) == (sha, "model", "corrupt")
        assert bad["dependents"]["variants"] == ["detector:v1/default (model file)"]
        assert f"rollout {rid} (running, targets held)" in bad["dependents"]["rollouts"]
        # a model file has no other source in the store: --repair alone cannot fix it
        res = lab.fleetctl("store", "verify", "--repair", "--json", check=False)
        assert res.returncode == 1
        assert "--from" in json.loads(res.stdout)["blobs"][0]["repair"]
        # a file that is not the model is refused, nothing written
        other = tmp_path / "other.onnx"
        other.write_bytes(model.read_bytes()[:-1] + b"\0")
        res = lab.fleetctl("store", "verify", "--repair", "--from", str(other), check=False)
        assert res.returncode == 1 and sha256_file(blob) != sha

        res = lab.fleetctl("store", "verify", "--repair", "--from", str(model), "--json",
                           check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        assert json.loads(res.stdout)["blobs"][0]["status"] == "repaired"
        assert sha256_file(blob) == sha

        # the held target resumes by itself and the rollout completes
        wait_for(lambda: lab.fleetctl_json("rollout", "status", str(rid))["state"]
                 in ("completed", "paused"), 90, "rollout finished")
        final = lab.fleetctl_json("rollout", "status", str(rid))
        assert final["state"] == "completed", final
        (t,) = final["targets"]
        assert (t["state"], t["attempts"]) == ("healthy", 1)
        assert lab.fleetctl("store", "verify").returncode == 0
    finally:
        watcher.close()
    # everything the server published is a chunk of the intact model
    good = chunk_hashes_file(model, CHUNK)
    assert watcher.seen and {s for s, _, _ in watcher.seen} == {sha}
    assert all(sha256_bytes(data) == good[i] for _, i, data in watcher.seen)


# -- in-process server (RolloutLab) with simulated devices: deltas and a mid-download corruption
def fleetctl(lab, *args: str):  # noqa: ANN201
    return lab.fleetctl(*args)

@pytest.fixture
def sim(rollout_lab, onnx_pair):
    return rollout_lab(onnx_pair(0.3))


def test_a_corrupt_delta_falls_back_to_the_full_artifact_and_repair_rebuilds_it(sim):
    from deltafleet.server.store.models import Delta

    sim.add_devices(1, {"hw": "a"}, prefix="a")
    sim.add_devices(1, {"hw": "b"}, prefix="b")
    sim.group("a", hw="a")
    sim.group("b", hw="b")
    first = sim.wait_state(sim.rollout("v2", "a", health_window_s=1), {"completed"}, 90)
    assert first["targets"][0]["artifact"] == "delta"
    with sim.store.session() as s:
        (delta,) = s.query(Delta).all()
        delta_sha, codec = delta.artifact_sha256, delta.codec
    overwrite_7_bytes(sim.blobs.path(delta_sha))

    rid = sim.rollout("v2", "b", health_window_s=1, max_failure_pct=0.0)
    done = sim.wait_state(rid, {"completed", "paused"}, 90)
    assert done["state"] == "completed", done
    (t,) = done["targets"]
    assert (t["state"], t["artifact"], t["attempts"]) == ("healthy", "full", 1)
    m = sim.fleet.devices["b-000"].manifests[-1].manifest
    assert m.artifact.kind == "full" and m.artifact.sha256 != delta_sha

    res = fleetctl(sim, "store", "verify", "--json")
    assert res.returncode == 1, res.stderr
    (bad,) = json.loads(res.stdout)["blobs"]
    assert (bad["sha256"], bad["kind"], bad["status"]) == (delta_sha, "delta", "corrupt")
    assert bad["dependents"]["deltas"][0].endswith(f"({codec})")
    res = fleetctl(sim, "store", "verify", "--repair", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    (fixed,) = json.loads(res.stdout)["blobs"]
    assert fixed["status"] == "repaired", fixed
    assert fleetctl(sim, "store", "verify").returncode == 0


def test_a_blob_corrupted_mid_download_stops_being_served_and_the_target_is_replanned(sim):
    sim.add_devices(1, {"hw": "c"}, prefix="c", version=None)  # first install: full artifact
    sim.group("c", hw="c")
    with sim.store.session() as s:
        from deltafleet.server import catalog

        (variant,) = catalog.resolve_version(s, "detector:v2").variants
        packed = variant.info["compressed"]["sha256"]
    watcher = ChunkWatcher(sim.cfg.mqtt_url, sim.cfg.topic_prefix)
    try:
        rid = sim.rollout("v2", "c", health_window_s=1, max_failure_pct=0.0,
                          bandwidth_bytes_per_s=CHUNK)  # one chunk a second
        sim.wait_for(lambda: watcher.seen, 60, "the first chunk published")
        overwrite_7_bytes(sim.blobs.path(packed))
        done = sim.wait_state(rid, {"completed", "paused"}, 90)
    finally:
        watcher.close()
    assert done["state"] == "completed", done
    (t,) = done["targets"]
    assert (t["state"], t["attempts"]) == ("healthy", 1)  # the corrupt send cost no attempt
    manifests = [r.manifest for r in sim.fleet.devices["c-000"].manifests]
    assert [m.artifact.sha256 for m in manifests] == [packed, variant.artifact_sha256]
    good = {m.artifact.sha256: m.artifact.chunks for m in manifests}
    assert all(sha256_bytes(data) == good[sha][i] for sha, i, data in watcher.seen)
    assert runs_sha(sim, "c-000") == variant.artifact_sha256


def runs_sha(sim, device_id: str) -> str:
    return sha256_bytes(sim.fleet.devices[device_id].models["detector"].data)
