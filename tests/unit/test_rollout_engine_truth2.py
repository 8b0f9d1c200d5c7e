"""Operator truth (issue 14), the pure rules: a device in a trial is not "already runs it" for
another rollout, an abort withdraws downloads too, and a download that fails before applying
counts the bytes it fetched."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from deltafleet.server.planner import RunningModel
from deltafleet.server.rollout import engine
from deltafleet.server.rollout.engine import (
    DeviceView,
    Dispatch,
    RecordBytes,
    RecordVariant,
    Report,
    SetReason,
    SetTarget,
    TargetView,
    Withdraw,
)
from deltafleet.server.rollout.states import RolloutState as R
from deltafleet.server.rollout.states import TargetState as T
from tests.unit.test_rollout_engine import OPT, POLICY, V1, V2, of, snap

NOW = datetime(2026, 12, 2, 16, 0, tzinfo=UTC)
ONNX = {"onnxruntime": "1.20"}


def runs(sha: str, *, trial: bool = False, online: bool = True, version: str = "v2",
         seen: datetime | None = None) -> DeviceView:
    return DeviceView("a", online, ONNX, RunningModel(sha, "default", version), True, seen,
                      in_trial=trial)


# -- a device in trial ---------------------------------------------------------------------
def test_a_device_trying_the_target_in_a_trial_stays_pending_and_says_why():
    out = engine.step(snap([TargetView("a", 0, T.PENDING)], [runs(V2, trial=True)]), NOW)
    assert not of(SetTarget, out) and not of(Dispatch, out)
    assert of(SetReason, out) == [SetReason(
        "a", "the device is trying v2 in a trial; healthy once it commits")]
    assert of(RecordVariant, out)[0].option == OPT


def test_once_the_trial_commits_the_target_is_healthy():
    out = engine.step(snap([TargetView("a", 0, T.PENDING)], [runs(V2)]), NOW)
    (d,) = of(SetTarget, out)
    assert d.state == T.HEALTHY and not of(Dispatch, out)


def test_if_the_trial_rolled_back_the_target_is_dispatched():
    out = engine.step(snap([TargetView("a", 0, T.PENDING)], [runs(V1, version="v1")]), NOW)
    (d,) = of(Dispatch, out)
    assert (d.device_id, d.state, d.kind) == ("a", T.NOTIFIED, "delta")


def test_a_trial_of_another_version_does_not_hold_the_target():
    out = engine.step(snap([TargetView("a", 0, T.PENDING)],
                           [runs(V1, trial=True, version="v1")]), NOW)
    assert of(Dispatch, out)  # runs v1 (in trial): v2 is sent as usual


def test_a_pending_device_in_trial_takes_no_concurrency_slot():
    policy = replace(POLICY, max_concurrent=1)
    targets = [TargetView("a", 0, T.PENDING), TargetView("b", 0, T.PENDING)]
    b = DeviceView("b", True, ONNX, RunningModel(V1, "default", "v1"), True)
    out = engine.step(snap(targets, [runs(V2, trial=True), b], policy=policy), NOW)
    assert [d.device_id for d in of(Dispatch, out)] == ["b"]


# -- abort -------------------------------------------------------------------------------------
def test_an_abort_withdraws_a_download_and_says_it_was_stopped():
    targets = [TargetView("a", 0, T.DOWNLOADING, manifest_id="m", artifact_kind="delta",
                          artifact_bytes=2048),
               TargetView("t", 0, T.TRIAL, manifest_id="m")]
    devices = [runs(V1, version="v1"), DeviceView("t", True, ONNX, None, True)]
    out = engine.step(snap(targets, devices, state=R.ABORTING), NOW)
    assert of(Withdraw, out) == [Withdraw("a")]  # a trial is not withdrawn: it goes on
    reasons = {d.device_id: d.reason for d in of(SetTarget, out)}
    assert reasons["a"] == ("rollout aborted while the device was downloading the delta "
                            "(2.0 KiB); manifest withdrawn, download stopped: it keeps the "
                            "version it runs")
    assert reasons["t"].endswith("it was not stopped and may end on v2")


def test_an_abort_of_an_offline_download_says_when_it_stops():
    gone = datetime(2026, 12, 2, 15, 0, tzinfo=UTC)
    t = TargetView("a", 0, T.DOWNLOADING, manifest_id="m")
    out = engine.step(snap([t], [runs(V1, online=False, seen=gone)], state=R.ABORTING), NOW)
    assert of(Withdraw, out) == [Withdraw("a")]
    (d,) = of(SetTarget, out)
    assert d.reason == ("rollout aborted while the device was downloading the artifact, "
                        "offline since 2026-12-02 15:00:00 UTC; manifest withdrawn: its "
                        "download gets no more chunks and stops at its download timeout, on "
                        "the version it runs")


# -- bytes of failed downloads -----------------------------------------------------------------
@pytest.mark.parametrize(("state", "rollback"), [(T.DOWNLOADING, False), (T.NOTIFIED, False),
                                                 (T.REVERTING, True)])
def test_a_download_that_fails_counts_what_it_fetched(state, rollback):
    t = TargetView("a", 0, state, attempts=1, manifest_id="m")
    out = engine.on_event(t, POLICY, Report("failed", "download timed out",
                                            bytes_received=70_000), NOW)
    assert out[0] == RecordBytes("a", 70_000, rollback)
    assert of(SetTarget, out)[0].state in (T.HELD, T.FAILED)


def test_a_failure_without_bytes_or_after_applying_records_none():
    down = TargetView("a", 0, T.DOWNLOADING, attempts=1, manifest_id="m")
    assert not of(RecordBytes, engine.on_event(
        down, POLICY, Report("failed", "refused", bytes_received=0), NOW))
    applying = TargetView("a", 0, T.APPLYING, attempts=1, manifest_id="m")
    assert not of(RecordBytes, engine.on_event(  # counted by its applying report already
        applying, POLICY, Report("failed", "bspatch", bytes_received=5), NOW))
    assert not of(RecordBytes, engine.on_event(
        down, POLICY, Report("downloading", bytes_received=9), NOW))
