"""``device_models.state`` (migration 0007) and what ``desired_models`` says, on a real
database (SQLite file; PostgreSQL too when it runs): a trial report marks what runs as in a
trial, a commit, a rollback or another sha256 clears it, a hello restating the sha256 leaves
it; an offline device's open target says it waits for the device."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import inspect

from deltafleet.server import fleet, views
from deltafleet.server.rollout.states import TargetState
from deltafleet.server.store import Store, head_revision
from deltafleet.server.store.models import DeviceModel, RolloutTarget
from deltafleet.shared import ModelState
from tests.integration.test_store_contract import blobs, db_url, hello, onnx_files, store

__all__ = ["blobs", "db_url", "onnx_files", "store"]  # the contract suite's fixtures

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
A, B = "a" * 64, "b" * 64


def state(store: Store, device_id: str = "dev-1") -> tuple[str, str | None]:
    with store.session() as s:
        row = s.get(DeviceModel, (device_id, "detector"))
        assert row is not None
        return row.sha256, row.state


def report(store: Store, sha: str, what: str, at: datetime = T0) -> None:
    with store.session() as s:
        fleet.record_device_model(s, "dev-1", "detector", "v2", None, sha, at, report=what)


def test_the_column_exists_at_head(store: Store, db_url: str) -> None:
    assert int(head_revision()) >= 7  # the column came in 0007
    cols = {c["name"]: c for c in inspect(store.engine).get_columns("device_models")}
    assert cols["state"]["nullable"] is True


def test_a_trial_report_marks_it_a_commit_clears_it_a_same_sha_hello_leaves_it(
        store: Store) -> None:
    with store.session() as s:
        fleet.upsert_devices_from_hellos(s, [hello(models=(ModelState("detector", "v1", A),))],
                                         T0)
    assert state(store) == (A, None)
    report(store, B, "trial")
    assert state(store) == (B, "trial")
    with store.session() as s:  # the agent restarts mid-trial: its hello names B again
        fleet.upsert_devices_from_hellos(s, [hello(models=(ModelState("detector", "v2", B),))],
                                         T0 + timedelta(seconds=1))
    assert state(store) == (B, "trial")
    report(store, B, "rejected")  # a manifest refused during the trial restates what runs
    assert state(store) == (B, "trial")
    report(store, B, "healthy")
    assert state(store) == (B, None)


def test_a_rollback_or_a_hello_of_another_sha_ends_the_trial(store: Store) -> None:
    with store.session() as s:
        fleet.upsert_devices_from_hellos(s, [hello(models=(ModelState("detector", "v1", A),))],
                                         T0)
    report(store, B, "trial")
    report(store, A, "rolled_back")
    assert state(store) == (A, None)
    report(store, B, "trial")
    with store.session() as s:  # the trial ended while the server was away
        fleet.upsert_devices_from_hellos(s, [hello(models=(ModelState("detector", "v1", A),))],
                                         T0 + timedelta(seconds=5))
    assert state(store) == (A, None)


def test_device_views_mark_a_trial_and_an_offline_device_waits(store: Store, blobs,
                                                               onnx_files) -> None:
    from deltafleet.server import catalog
    from deltafleet.server.policy import RolloutPolicy
    from deltafleet.server.rollouts import create_rollout

    with store.session() as s:
        catalog.add_model_version(s, blobs, "detector", "v1", onnx_files[0])
        catalog.add_model_version(s, blobs, "detector", "v2", onnx_files[1])
        fleet.upsert_devices_from_hellos(s, [hello(models=())], T0)
        fleet.create_group(s, "all", {})
    with store.session() as s:
        rid = create_rollout(s, "detector:v2", "all", "test", policy=RolloutPolicy()).id
        fleet.set_device_online(s, "dev-1", False, T0 + timedelta(minutes=3))
    with store.session() as s:
        d = fleet.get_device(s, "dev-1")
        (asked,) = views.device_to_json(d, fleet.desired_models(s, [d])[d.id])["desired"]
    assert (asked["rollout_id"], asked["state"]) == (rid, "pending")
    assert asked["waiting"] == "device offline since 2026-12-02 12:03:00 UTC"
    assert asked["why"].startswith("pending: waiting: device offline since 2026-12-02 "
                                   "12:03:00 UTC; the update is sent when it reconnects")

    with store.session() as s:  # back online, trying v2 in a trial of this rollout's target
        fleet.set_device_online(s, "dev-1", True, T0 + timedelta(minutes=4))
        t = s.query(RolloutTarget).one()
        t.state, t.target_sha256 = TargetState.TRIAL.value, catalog_sha(s)
        fleet.record_device_model(s, "dev-1", "detector", "v2", None, t.target_sha256,
                                  T0 + timedelta(minutes=4), report="trial")
    with store.session() as s:
        d = fleet.get_device(s, "dev-1")
        shown = views.device_to_json(d, fleet.desired_models(s, [d])[d.id])
    (running,) = shown["running"]
    assert (running["version"], running["state"]) == ("v2", "trial")
    assert shown["desired"] == []  # its own trial: what runs says it


def catalog_sha(s) -> str:
    from deltafleet.server.store.models import Variant

    return max(s.query(Variant).all(), key=lambda v: v.id).artifact_sha256
