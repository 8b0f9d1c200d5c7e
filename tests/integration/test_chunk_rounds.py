"""Chunk rounds under real timing, with the real server and a real broker: devices that start
asking at staggered times are served by a few rounds of one publish per chunk, bounded by time
(one round per ``chunk_round_s`` at most) and not by the number of devices or join times; a
device joining while a round is still sending is served by it, and only what it missed goes
out again, once, in the next round."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deltafleet.server.config import ServerConfig
from deltafleet.server.delivery.chunks import DeliveryStats
from deltafleet.shared import sha256_file
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
    assert data["state"] == "completed", data["state_reason"]
    assert len(data["targets"]) == len(ids)
    assert all(t["state"] == "healthy" for t in data["targets"])
    want = sha256_file(models["v1"])
    assert all(lab.fleet.devices[d].models["detector"].sha256 == want for d in ids)


def test_devices_asking_over_12_s_are_served_by_rounds_bounded_by_time(rollout_lab, models):
    """30 devices: 5 ask at once, then one more every 0.4 s (the last 11.6 s later, long
    after the first round went out). One round per ``chunk_round_s`` at most, whatever the
    number of join times (26 here)."""
    lab = rollout_lab(models)
    ids = fleet_offline(lab, 30, early=5)
    rid = lab.rollout("v1", "cams", **FAST)
    sha, chunks, size = artifact(lab, ids[0])
    started = time.monotonic()
    for device_id in ids[5:]:
        time.sleep(0.4)
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
    lab = rollout_lab(models)
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


def test_the_round_window_is_a_setting() -> None:
    cfg = ServerConfig.from_env({"FLEET_HOME": "/tmp/x", "FLEET_CHUNK_ROUND_S": "12.5"})
    assert cfg.chunk_round_s == 12.5
    assert ServerConfig.from_env({"FLEET_HOME": "/tmp/x"}).chunk_round_s == 5.0
