"""Fleet-scale delivery and scale-out, at test size: one publish per chunk for many devices,
and a rollout that survives the death of the replica working it (two server processes on
PostgreSQL sharing device traffic through a shared subscription)."""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path

import pytest

from deltafleet.server.store.models import Rollout
from deltafleet.shared import sha256_file
from tests.harness.rollout_lab import RolloutLab

pytestmark = pytest.mark.broker


@pytest.fixture
def models(onnx_pair) -> dict[str, Path]:
    return onnx_pair(1.0)


def offered(lab: RolloutLab, ids: list[str]) -> None:
    """Until every device in ``ids`` has its manifest (the next group then joins later)."""
    lab.wait_for(lambda: all(lab.fleet.devices[d].manifests for d in ids), 30,
                 f"{len(ids)} devices offered the model")


def test_one_publish_per_chunk_serves_every_device_joining_at_different_times(tmp_path, broker,
                                                                              models):
    lab = RolloutLab(tmp_path, broker.url, models)
    lab.start_server()
    try:
        joined = lab.add_devices(5, {"hw": "cam"}, prefix="early", version=None)
        lab.group("cams", hw="cam")
        rid = lab.rollout("v1", "cams", health_window_s=1)
        for batch in range(3):  # three more groups of 5 join while the rollout runs
            offered(lab, joined)
            joined = lab.add_devices(5, {"hw": "cam"}, prefix=f"late{batch}", version=None)
        data = lab.wait_state(rid, {"completed"}, 90)
        assert len(data["targets"]) == 20
        assert all(t["state"] == "healthy" and t["artifact"] == "full" for t in data["targets"])
        full = models["v1"].stat().st_size
        published = lab.server.stats.chunk_bytes_published
        unicast = 20 * full
        # four join times -> at most about one publish of the artifact per join, never one
        # per device
        assert published <= 4.5 * full, (published / full, lab.server.stats)
        assert published < unicast / 4
        assert all(d.models["detector"].sha256 == sha256_file(models["v1"])
                   for d in lab.fleet.devices.values())
    finally:
        lab.close()


def test_a_wave_of_devices_is_served_by_about_one_publish_of_the_artifact(tmp_path, broker,
                                                                          models):
    lab = RolloutLab(tmp_path, broker.url, models)
    lab.start_server()
    try:
        lab.add_devices(20, {"hw": "cam"}, version=None)
        lab.group("cams", hw="cam")
        rid = lab.rollout("v1", "cams", health_window_s=1)
        lab.wait_state(rid, {"completed"}, 90)
        ratio = lab.server.stats.chunk_bytes_published / models["v1"].stat().st_size
        assert ratio <= 1.5, lab.server.stats
    finally:
        lab.close()


@pytest.mark.postgres
def test_rollout_completes_when_the_replica_working_it_is_killed(tmp_path, broker, models,
                                                                 pg_url):
    from tests.harness.fleetlab import Lab

    lab = RolloutLab(tmp_path, broker.url, models, db_url=pg_url)
    procs = Lab(tmp_path / "procs", mqtt_url=broker.url, db_url=pg_url)
    procs.env.update(FLEET_HOME=str(lab.cfg.home), FLEET_TOPIC_PREFIX=lab.cfg.topic_prefix,
                     FLEET_SHARE_GROUP=secrets.token_urlsafe(18))
    try:
        a = procs.start_server("server-a")
        b = procs.start_server("server-b")
        ids = lab.add_devices(20, {"hw": "cam"})
        lab.group("cams", hw="cam")
        rid = lab.rollout("v2", "cams", canary="2", waves=(50.0, 100.0), health_window_s=2)
        lab.wait_for(lambda: lab.status(rid)["current_wave"] >= 1, 60, "wave 2 opened")
        with lab.store.session() as s:
            owner = s.get(Rollout, rid).lease_owner
        pid = int(owner.split(":")[1])
        victim = a if pid == a.pid else b
        assert victim.pid == pid
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        data = lab.wait_state(rid, {"completed"}, 120)
        took = time.monotonic() - t0
        assert all(t["state"] == "healthy" for t in data["targets"])
        assert all(len(lab.fleet.devices[d].manifests) == 1 for d in ids)  # nobody twice
        with lab.store.session() as s:
            assert s.get(Rollout, rid).lease_owner != owner
        print(f"failover: rollout completed {took:.1f} s after the owner was killed")
    finally:
        procs.close()
        lab.close()
