"""Chunk delivery under real timing, with the real server and a real broker.

Retained chunks (the default): each chunk is published once per rollout however late devices
ask, cleared from the broker once no rollout serves the artifact, and published once more
when the broker lost them (restarted without persistence).

Rounds (``chunk_retain`` off): devices that start asking at staggered times are served by a
few rounds of one publish per chunk, bounded by time (one round per ``chunk_round_s`` at most)
and not by the number of devices or join times; a device joining while a round is still sending
is served by it, and only what it missed goes out again, once, in the next round."""

from __future__ import annotations

import dataclasses
import queue
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deltafleet.server.config import ServerConfig
from deltafleet.server.delivery.chunks import DeliveryStats
from deltafleet.shared import sha256_file
from tests.harness.mqtt_peer import subscribed_client
from tests.harness.rollout_lab import RolloutLab

pytestmark = pytest.mark.broker

FAST = {"health_window_s": 1, "retry_backoff_s": 1, "state_timeout_s": 120}


@pytest.fixture
def models(onnx_pair) -> dict[str, Path]:
    return onnx_pair(1.0)


class NoCache(dict):
    """A model cache that keeps nothing: every device downloads (none installs the model
    another simulated device already holds)."""

    def setdefault(self, key, default=None):  # type: ignore[no-untyped-def]
        return default


def fleet_offline(lab: RolloutLab, n: int, early: int) -> list[str]:
    """``n`` devices without the model, registered; all but the first ``early`` go offline."""
    lab.fleet.model_cache = NoCache()
    ids = lab.add_devices(n, {"hw": "cam"}, version=None)
    for device_id in ids[early:]:
        lab.fleet.devices[device_id].go_offline()
    lab.group("cams", hw="cam")
    return ids


def artifact(lab: RolloutLab, device_id: str) -> tuple[str, int, int]:
    """(sha256, chunks, size) of the artifact the device was offered."""
    lab.wait_for(lambda: lab.fleet.devices[device_id].manifests, 30, f"{device_id} offered")
    a = lab.fleet.devices[device_id].manifests[0].manifest.artifact
    return a.sha256, len(a.chunks), a.size_bytes


def all_healthy(lab: RolloutLab, rid: int, ids: list[str], models: dict[str, Path]) -> None:
    data = lab.wait_state(rid, {"completed", "paused"}, 120)
    assert data["state"] == "completed", (data["state_reason"], [
        (t["device"], t["state"], t["reason"]) for t in data["targets"]
        if t["state"] != "healthy"])
    assert len(data["targets"]) == len(ids)
    assert all(t["state"] == "healthy" for t in data["targets"])
    want = sha256_file(models["v1"])
    assert all(lab.fleet.devices[d].models["detector"].sha256 == want for d in ids)


def lab_with(make: Callable[..., RolloutLab], models: dict[str, Path], **cfg: object
             ) -> RolloutLab:
    lab = make(models, start=False)
    lab.cfg = dataclasses.replace(lab.cfg, **cfg)
    lab.start_server()
    return lab


def test_devices_asking_over_12_s_are_served_by_rounds_bounded_by_time(rollout_lab, models):
    """30 devices: 5 ask at once, then one more every 0.4 s (the last 11.6 s later, long
    after the first round went out). One round per ``chunk_round_s`` at most, whatever the
    number of join times (26 here)."""
    lab = lab_with(rollout_lab, models, chunk_retain=False)
    ids = fleet_offline(lab, 30, early=5)
    rid = lab.rollout("v1", "cams", **FAST)
    sha, chunks, size = artifact(lab, ids[0])
    started = time.monotonic()
    for device_id in ids[5:]:
        time.sleep(0.4)  # deliberate: the staggered join times are the scenario
        lab.fleet.devices[device_id].come_online()
    spread_s = time.monotonic() - started
    all_healthy(lab, rid, ids, models)
    assert lab.server is not None
    stats = lab.server.chunks.stats(sha)
    ratio = lab.server.stats.chunk_bytes_published / size
    print(f"\nstaggered: 30 devices over {spread_s:.1f} s, {chunks} chunks: {stats}, "
          f"published/artifact {ratio:.2f}")
    round_s = lab.cfg.chunk_round_s
    assert stats.published <= chunks * stats.rounds
    assert 2 <= stats.rounds <= 1 + spread_s / round_s + 1, stats  # not 26: one per join
    assert stats.repairs == 0
    assert lab.server.stats.chunk_bytes_published <= stats.rounds * size


def test_a_late_joiner_is_served_by_the_round_the_others_are_still_downloading(rollout_lab,
                                                                               models):
    """The bandwidth cap makes round 1 last seconds; a device coming online while it runs
    receives the rest of round 1 and only the chunks it missed go out again, in round 2."""
    lab = lab_with(rollout_lab, models, chunk_retain=False)
    ids = fleet_offline(lab, 6, early=5)
    rid = lab.rollout("v1", "cams", bandwidth_bytes_per_s=128 * 1024, **FAST)
    sha, chunks, size = artifact(lab, ids[0])
    assert chunks >= 10, "the artifact must take the capped round several seconds"
    lab.wait_for(lambda: lab.server.chunks.stats(sha).published >= 6, 30, "round 1 sending")
    lab.fleet.devices[ids[5]].come_online()
    all_healthy(lab, rid, ids, models)
    stats = lab.server.chunks.stats(sha)
    print(f"\nmid-round joiner: {chunks} chunks: {stats}, published/artifact "
          f"{lab.server.stats.chunk_bytes_published / size:.2f}")
    assert stats.rounds == 2, stats
    assert chunks + 6 <= stats.published < 2 * chunks, stats  # round 2: what it missed only
    assert stats == DeliveryStats(stats.published, 2, 0)


def retained_on_broker(lab: RolloutLab, broker_url: str, sha: str, wait_s: float = 2.0
                       ) -> list[tuple[str, bytes]]:
    """What a new subscriber to the artifact's chunk topics receives within ``wait_s``."""
    client = subscribed_client(broker_url, "peek", f"{lab.cfg.topic_prefix}/art/{sha}/#")
    got: list[tuple[str, bytes]] = []
    try:
        end = time.monotonic() + wait_s
        while (left := end - time.monotonic()) > 0:
            try:
                topic, payload = client.inbox.get(timeout=left)
            except queue.Empty:
                break
            if not topic.startswith("$"):
                got.append((topic, payload))
    finally:
        client.stop()
    return got


def test_retained_devices_asking_late_cost_no_publish_and_the_chunks_are_cleared_after(
        rollout_lab, broker, models):
    """30 devices: 5 at once, 20 more one every 0.4 s, the last 5 long after the first round
    (and after ``chunk_round_s``): every chunk is published once (published/artifact 1.00),
    every device ends healthy, and once the rollout completed the broker holds none of them."""
    lab = lab_with(rollout_lab, models, chunk_retain_linger_s=1.0)
    ids = fleet_offline(lab, 30, early=5)
    rid = lab.rollout("v1", "cams", **FAST)
    sha, chunks, size = artifact(lab, ids[0])
    assert lab.server is not None
    started = time.monotonic()
    lab.wait_for(lambda: lab.server.chunks.stats(sha).published >= chunks, 30, "round 1 sent")
    for device_id in ids[5:25]:
        time.sleep(0.4)  # deliberate: the staggered join times are the scenario
        lab.fleet.devices[device_id].come_online()
    time.sleep(lab.cfg.chunk_round_s + 1)  # deliberate: the last five join after a round ends
    for device_id in ids[25:]:
        lab.fleet.devices[device_id].come_online()
    spread_s = time.monotonic() - started
    all_healthy(lab, rid, ids, models)
    stats = lab.server.chunks.stats(sha)
    ratio = lab.server.stats.chunk_bytes_published / size
    print(f"\nretained: 30 devices over {spread_s:.1f} s, {chunks} chunks: {stats}, "
          f"published/artifact {ratio:.2f}")
    assert stats == DeliveryStats(chunks, 1, 0), stats
    assert lab.server.stats.chunk_bytes_published == size
    lab.wait_for(lambda: lab.server.stats.chunks_cleared == chunks, 30, "chunks cleared")
    assert retained_on_broker(lab, broker.url, sha) == []
    assert lab.server.chunks.retained == {}
    assert lab.server.retained.load() == {}


def test_retained_chunks_left_while_the_server_was_down_are_cleared_after_its_restart(
        rollout_lab, broker, models):
    lab = lab_with(rollout_lab, models, chunk_retain_linger_s=1.0)
    ids = fleet_offline(lab, 2, early=2)
    lab.rollout("v1", "cams", **FAST)
    sha, chunks, _ = artifact(lab, ids[0])
    assert lab.server is not None
    lab.wait_for(lambda: lab.server.chunks.stats(sha).published >= chunks, 30, "round 1 sent")
    lab.wait_for(lambda: lab.server.retained.load() == {sha: chunks}, 10, "list recorded")
    lab.stop_server()
    assert len(retained_on_broker(lab, broker.url, sha)) == chunks
    # while it was down the artifact left every rollout
    lab.cfg = dataclasses.replace(lab.cfg, db_url=lab.cfg.db_url + ".other")
    from deltafleet.server.store import upgrade

    upgrade(lab.cfg.db_url)
    lab.start_server()
    lab.wait_for(lambda: lab.server.stats.chunks_cleared == chunks, 30, "chunks cleared")
    assert retained_on_broker(lab, broker.url, sha) == []


def test_retained_a_broker_restarted_without_persistence_still_serves_every_device(
        tmp_path, fresh_broker, models):
    """The broker loses its retained chunks (and every session) mid-rollout, after the first
    devices are healthy; the devices coming online afterwards still end healthy: the server
    reconnected without a session, so each chunk goes out once more. (The restart waits for the
    first devices to be healthy because the simulated devices, unlike the agent, do not send an
    event again when the broker dropped it.)"""
    lab = RolloutLab(tmp_path, fresh_broker.url, models)
    try:
        lab.start_server()
        assert lab.server is not None
        ids = fleet_offline(lab, 8, early=4)
        rid = lab.rollout("v1", "cams", **FAST)
        sha, chunks, size = artifact(lab, ids[0])
        lab.wait_for(lambda: sum(t["state"] == "healthy" for t in lab.status(rid)["targets"])
                     == 4, 60, "the first devices healthy")
        fresh_broker.kill()
        fresh_broker.start()
        lab.wait_for(lambda: lab.server.mqtt.connected.is_set(), 30, "server reconnected")
        for device_id in ids[4:]:
            lab.fleet.devices[device_id].come_online()
        all_healthy(lab, rid, ids, models)
        stats = lab.server.chunks.stats(sha)
        print(f"\nbroker restarted: {chunks} chunks: {stats}, published/artifact "
              f"{lab.server.stats.chunk_bytes_published / size:.2f}")
        assert stats == DeliveryStats(2 * chunks, 2, 0), stats
    finally:
        lab.close()


def test_the_round_window_is_a_setting() -> None:
    cfg = ServerConfig.from_env({"FLEET_HOME": "/tmp/x", "FLEET_CHUNK_ROUND_S": "12.5"})
    assert cfg.chunk_round_s == 12.5
    assert ServerConfig.from_env({"FLEET_HOME": "/tmp/x"}).chunk_round_s == 5.0


@pytest.mark.parametrize(("raw", "retain"), [(None, True), ("", True), ("1", True),
                                             ("true", True), ("0", False), ("off", False)])
def test_retained_chunks_are_a_setting(raw: str | None, retain: bool) -> None:
    env = {"FLEET_HOME": "/tmp/x"} | ({} if raw is None else {"FLEET_CHUNK_RETAIN": raw})
    assert ServerConfig.from_env(env).chunk_retain is retain
    linger = ServerConfig.from_env({"FLEET_HOME": "/tmp/x", "FLEET_CHUNK_RETAIN_LINGER_S": "60"})
    assert linger.chunk_retain_linger_s == 60.0


def test_a_bad_retain_setting_is_refused() -> None:
    from deltafleet.server.errors import UsageError

    with pytest.raises(UsageError, match="FLEET_CHUNK_RETAIN"):
        ServerConfig.from_env({"FLEET_HOME": "/tmp/x", "FLEET_CHUNK_RETAIN": "maybe"})
