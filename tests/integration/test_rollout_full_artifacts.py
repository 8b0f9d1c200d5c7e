"""Full installs ship the model zstd-compressed: first installs, deltas not worth it and
rollbacks, through the real server (controller, chunk publisher) and simulated devices on a
real broker that download, decode with the agent's decoder and verify every artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from deltafleet.server import catalog
from deltafleet.server.planner import delta_worth_it
from deltafleet.server.rollouts import plan_rollout
from deltafleet.server.store.models import Artifact, Delta, Variant
from deltafleet.shared import Manifest, sha256_bytes, sha256_file
from tests.harness.modelgen import make_incompressible_onnx_model
from tests.harness.rollout_lab import RolloutLab

pytestmark = pytest.mark.broker

FAST = {"health_window_s": 1, "retry_backoff_s": 1, "state_timeout_s": 60}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, onnx_pair) -> dict[str, Path]:
    noise = make_incompressible_onnx_model(tmp_path_factory.mktemp("models") / "noise.onnx",
                                           size_mb=0.2)
    return {**onnx_pair(0.3), "noise": noise}


@pytest.fixture
def lab(rollout_lab, models) -> RolloutLab:
    return rollout_lab(models)


def variant_of(lab: RolloutLab, version: str) -> Variant:
    with lab.store.session() as s:
        (variant,) = catalog.resolve_version(s, f"detector:{version}").variants
        return variant


def compressed(lab: RolloutLab, version: str) -> dict[str, Any] | None:
    return variant_of(lab, version).info.get("compressed")


def last_manifest(lab: RolloutLab, device_id: str) -> Manifest:
    return lab.fleet.devices[device_id].manifests[-1].manifest


def runs(lab: RolloutLab, device_id: str) -> str:
    """The sha256 of the bytes the device installed (decoded and verified, not just claimed)."""
    return sha256_bytes(lab.fleet.devices[device_id].models["detector"].data)


def add_unhelpful_delta(lab: RolloutLab, base: str, target: str) -> int:
    """A cached delta 10% smaller than the target model file, so smaller than the model by the
    planner's margin but not smaller than the model's compressed form. Its blob is never read."""
    size = int(0.9 * lab.files[target].stat().st_size)
    packed = compressed(lab, target)
    assert packed is not None
    assert delta_worth_it(size, lab.files[target].stat().st_size)
    assert not delta_worth_it(size, packed["size_bytes"])
    with lab.store.session() as s:
        s.add(Artifact(sha256="d" * 64, size_bytes=size, kind="delta"))
        s.flush()
        s.add(Delta(base_sha256=sha256_file(lab.files[base]),
                    target_sha256=sha256_file(lab.files[target]), codec="bsdiff4",
                    artifact_sha256="d" * 64, size_bytes=size))
    return size


def test_device_running_no_version_gets_the_model_zstd_compressed(lab):
    ids = lab.add_devices(3, {"hw": "cam"}, version=None)
    lab.group("cams", hw="cam")
    rid = lab.rollout("v1", "cams", **FAST)
    data = lab.wait_state(rid, {"completed", "paused"}, 60)
    assert data["state"] == "completed", data["targets"]
    packed = compressed(lab, "v1")
    model_size, model_sha = lab.files["v1"].stat().st_size, sha256_file(lab.files["v1"])
    assert packed is not None and packed["size_bytes"] < model_size
    for device_id in ids:
        m = last_manifest(lab, device_id)
        assert (m.artifact.kind, m.artifact.codec) == ("full", "zstd")
        assert (m.artifact.sha256, m.artifact.size_bytes) == (packed["sha256"],
                                                              packed["size_bytes"])
        assert (m.target_sha256, m.target_size_bytes, m.base_sha256) == (model_sha, model_size,
                                                                         None)
        assert runs(lab, device_id) == model_sha
    assert all(t["state"] == "healthy" and t["artifact"] == "full"
               and t["bytes_sent"] == packed["size_bytes"] and t["full_bytes"] == model_size
               for t in data["targets"])
    assert lab.server is not None
    assert lab.server.stats.chunk_bytes_published >= packed["size_bytes"]  # its chunks served


def test_rollback_sends_the_previous_model_zstd_compressed(lab):
    ids = lab.add_devices(3, {"hw": "cam"})
    lab.group("cams", hw="cam")
    rid = lab.rollout("v2", "cams", **FAST)
    lab.wait_state(rid, {"completed"}, 60)
    lab.fleet.model_cache.clear()  # the devices lost v1: reverting downloads it
    assert lab.act(rid, "rollback")
    data = lab.wait_state(rid, {"rolled_back"}, 60)
    assert all(t["state"] == "reverted" for t in data["targets"])
    packed = compressed(lab, "v1")
    assert packed is not None
    v1 = sha256_file(lab.files["v1"])
    for device_id in ids:
        m = last_manifest(lab, device_id)
        assert (m.artifact.kind, m.artifact.codec, m.artifact.sha256) == ("full", "zstd",
                                                                          packed["sha256"])
        assert m.target_sha256 == v1 and runs(lab, device_id) == v1


def test_model_zstd_cannot_shrink_ships_as_it_is(lab):
    assert compressed(lab, "noise") is None
    ids = lab.add_devices(2, {"hw": "cam"}, version=None)
    lab.group("cams", hw="cam")
    rid = lab.rollout("noise", "cams", **FAST)
    assert lab.wait_state(rid, {"completed", "paused"}, 60)["state"] == "completed"
    noise = sha256_file(lab.files["noise"])
    for device_id in ids:
        m = last_manifest(lab, device_id)
        assert (m.artifact.kind, m.artifact.codec, m.artifact.sha256) == ("full", "identity",
                                                                          noise)
        assert runs(lab, device_id) == noise


def test_model_registered_before_compression_ships_as_it_is(lab):
    with lab.store.session() as s:  # what a variant registered before this change looks like
        variant = s.scalars(select(Variant).where(
            Variant.artifact_sha256 == sha256_file(lab.files["v1"]))).one()
        variant.info = {k: v for k, v in variant.info.items() if k != "compressed"}
    ids = lab.add_devices(2, {"hw": "cam"}, version=None)
    lab.group("cams", hw="cam")
    rid = lab.rollout("v1", "cams", **FAST)
    data = lab.wait_state(rid, {"completed", "paused"}, 60)
    assert data["state"] == "completed"
    v1 = sha256_file(lab.files["v1"])
    for device_id in ids:
        m = last_manifest(lab, device_id)
        assert (m.artifact.codec, m.artifact.sha256) == ("identity", v1)
        assert runs(lab, device_id) == v1
    assert all(t["bytes_sent"] == t["full_bytes"] for t in data["targets"])


def test_delta_not_smaller_than_the_compressed_model_is_not_sent(lab):
    ids = lab.add_devices(2, {"hw": "cam"})
    lab.group("cams", hw="cam")
    add_unhelpful_delta(lab, "v1", "v2")
    rid = lab.rollout("v2", "cams", **FAST)
    assert lab.wait_state(rid, {"completed", "paused"}, 60)["state"] == "completed"
    packed = compressed(lab, "v2")
    assert packed is not None
    for device_id in ids:
        m = last_manifest(lab, device_id)
        assert (m.artifact.kind, m.artifact.codec, m.artifact.sha256) == ("full", "zstd",
                                                                          packed["sha256"])
        assert runs(lab, device_id) == sha256_file(lab.files["v2"])


def test_plan_counts_full_installs_at_their_compressed_size(lab):
    (on_v1,) = lab.add_devices(1, {"hw": "cam"})
    (fresh,) = lab.add_devices(1, {"hw": "cam"}, prefix="fresh", version=None)
    lab.group("cams", hw="cam")
    add_unhelpful_delta(lab, "v1", "v2")
    with lab.store.session() as s:
        plan = plan_rollout(s, "detector:v2", "cams")
    packed = compressed(lab, "v2")
    assert packed is not None
    model_size = lab.files["v2"].stat().st_size
    rows = {d["device"]: d for d in plan["devices"]}
    for device_id in (on_v1, fresh):
        row = rows[device_id]
        assert (row["artifact"], row["codec"]) == ("full", "zstd")
        assert (row["bytes"], row["full_bytes"]) == (packed["size_bytes"], model_size)
    assert "not worth it, full" in rows[on_v1]["reason"]  # against the full artifact's size
    assert rows[on_v1]["reason"].endswith(" sent")
    assert (plan["bytes"], plan["full_bytes"]) == (2 * packed["size_bytes"], 2 * model_size)
