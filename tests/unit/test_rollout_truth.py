"""The pure rules behind truthful rollout states: the planner explains delta or full with the
figures, a pinned variant goes to every device that can load it, the engine sends nothing to
an offline device, counts the bytes devices report (a rollback's apart), and names what a
device was doing when it failed, timed out or was aborted."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from deltafleet.server import planner
from deltafleet.server.policy import RolloutPolicy
from deltafleet.server.rollout import engine
from deltafleet.server.rollout.engine import (
    DeviceView,
    Dispatch,
    RecordBytes,
    Report,
    SetRollout,
    SetTarget,
    Snapshot,
    TargetView,
)
from deltafleet.server.rollout.states import RolloutState as R
from deltafleet.server.rollout.states import TargetState as T

NOW = datetime(2026, 12, 2, 5, 0, tzinfo=UTC)
KIB = 1024
V1, V2, DELTA = "1" * 64, "2" * 64, "4" * 64
FULL = planner.VariantOption(1, "default", "onnx", "fp32", V2, 2000 * KIB,
                     compressed=planner.FullArtifact("zstd", "3" * 64, 1900 * KIB))
SLIM = planner.VariantOption(2, "slim", "onnx", "fp16", "5" * 64, 900 * KIB)
LITE = planner.VariantOption(3, "lite", "tflite", "int8", "6" * 64, 500 * KIB)
ONNX = {"onnxruntime": "1.20"}
RUNS_V1 = planner.RunningModel(V1, "default", "v1")
POLICY = RolloutPolicy(max_attempts=3, retry_backoff_s=30, state_timeout_s=600)


def plan(running, deltas=None, failed=None, bad=frozenset(), pinned=None, runtimes=None):
    return planner.plan_target(ONNX if runtimes is None else runtimes, running, [FULL, SLIM, LITE],
                       deltas=deltas or {}, failed_deltas=failed or {},
                       blob_problem=lambda sha: "missing" if sha in bad else None,
                       pinned=pinned)


# -- the planner explains itself ---------------------------------------------------------------
def test_sizes_and_shares_read_as_an_operator_reads_them():
    assert (planner.size_text(512), planner.size_text(120 * KIB), planner.size_text(int(1.7 * KIB * KIB))) == (
        "512 B", "120.0 KiB", "1.7 MiB")
    assert (planner.share_text(120, 2000), planner.share_text(1, 10_000), planner.share_text(0, 10)) == ("6%", "1%", "0%")


def test_a_delta_worth_sending_says_its_size_and_share_of_the_full_artifact():
    p = plan(RUNS_V1, {(V1, V2): planner.DeltaOption("bsdiff4", DELTA, 120 * KIB)})
    assert p.kind == planner.PlanKind.DELTA
    assert p.reason == "delta 120.0 KiB from v1 (6% of full, 1.9 MiB compressed)"


def test_a_delta_not_worth_it_says_why_the_full_artifact_went():
    p = plan(RUNS_V1, {(V1, V2): planner.DeltaOption("bsdiff4", DELTA, 1750 * KIB)})
    assert p.kind == planner.PlanKind.FULL and p.bytes == 1900 * KIB
    assert p.reason == "delta 1.7 MiB is 92% of full (1.9 MiB compressed): not worth it, full sent"


@pytest.mark.parametrize(("running", "failed", "bad", "reason"), [
    (None, {}, set(), "no version of the model on the device: full sent (1.9 MiB compressed)"),
    (RUNS_V1, {}, {V1},
     "no delta from v1 (base not in the server's store): full sent (1.9 MiB compressed)"),
    (RUNS_V1, {(V1, V2): "bsdiff4 gave 2.0 MiB"}, set(),
     "no delta from v1 (bsdiff4 gave 2.0 MiB): full sent (1.9 MiB compressed)"),
    (planner.RunningModel(V1), {}, {V1},
     f"no delta from {V1[:12]} (base not in the server's store): full sent (1.9 MiB "
     "compressed)"),
])
def test_a_full_install_names_why_there_is_no_delta(running, failed, bad, reason):
    p = plan(running, failed=failed, bad=bad)
    assert (p.kind, p.reason) == (planner.PlanKind.FULL, reason)


# -- a pinned variant --------------------------------------------------------------------------
def test_a_pinned_variant_wins_over_the_one_the_device_runs():
    assert planner.choose_variant(ONNX, "default", [FULL, SLIM], "slim").variant == SLIM
    p = plan(RUNS_V1, pinned="slim")
    # deltas stay within a variant's lineage: a device moving to another variant gets it whole
    assert p.variant == SLIM and p.kind == planner.PlanKind.FULL
    assert "no delta across variants" in p.reason


def test_a_device_that_cannot_load_the_pinned_variant_is_told_why():
    choice = planner.choose_variant(ONNX, None, [FULL, LITE], "lite")
    assert choice.variant is None
    assert choice.reason == "cannot load pinned variant lite (tflite): it has runtimes " \
                            "[onnxruntime]"
    assert plan(RUNS_V1, pinned="lite").kind == planner.PlanKind.SKIP
    assert "no variant 'gone'" in planner.choose_variant(ONNX, None, [FULL], "gone").reason


def test_the_pin_travels_in_the_policy():
    policy = RolloutPolicy.from_options(variant="slim")
    assert RolloutPolicy.from_json(policy.to_json()).variant == "slim"
    assert RolloutPolicy.from_json({}).variant is None  # rollouts from before the pin


# -- the engine --------------------------------------------------------------------------------
def device(i: str, *, online: bool = True, runs: planner.RunningModel | None = RUNS_V1,
           seen: datetime | None = None) -> DeviceView:
    return DeviceView(i, online, ONNX, runs, True, seen)


def snap(targets, devices, *, state: R = R.RUNNING, policy: RolloutPolicy = POLICY) -> Snapshot:
    return Snapshot(engine.RolloutView(1, state, policy, "v2"), tuple(targets),
                    {d.device_id: d for d in devices}, (FULL,),
                    {(V1, V2): planner.DeltaOption("bsdiff4", DELTA, 120 * KIB)})


def of(kind, decisions):
    return [d for d in decisions if isinstance(d, kind)]


def test_an_offline_device_is_sent_nothing_and_keeps_no_slot():
    gone = NOW - timedelta(minutes=5)
    targets = [TargetView("off", 0, T.PENDING), TargetView("on", 0, T.PENDING)]
    out = engine.step(snap(targets, [device("off", online=False, seen=gone), device("on")],
                           policy=replace(POLICY, max_concurrent=1)), NOW)
    (d,) = of(Dispatch, out)
    assert d.device_id == "on"  # the offline device took no --max-concurrent slot
    assert not [x for x in out if getattr(x, "device_id", None) == "off"]


def test_a_dispatch_carries_the_planner_reason_as_its_note():
    (d,) = of(Dispatch, engine.step(snap([TargetView("a", 0, T.PENDING)], [device("a")]), NOW))
    assert (d.kind, d.note) == ("delta", "delta 120.0 KiB from v1 (6% of full, 1.9 MiB compressed)")


@pytest.mark.parametrize(("state", "rollback"), [(T.DOWNLOADING, False), (T.REVERTING, True)])
def test_an_applying_report_records_what_the_device_fetched(state, rollback):
    t = TargetView("a", 0, state, attempts=1, manifest_id="m")
    out = engine.on_event(t, POLICY, Report("applying", bytes_received=0), NOW)
    assert out[0] == RecordBytes("a", 0, rollback)
    assert not of(RecordBytes, engine.on_event(t, POLICY, Report("trial"), NOW))


def test_a_reported_failure_names_the_phase_it_happened_in():
    t = TargetView("a", 0, T.APPLYING, attempts=1)
    (d,) = engine.on_event(t, POLICY, Report("failed", "bspatch failed"), NOW)
    assert d.reason == "failed applying: bspatch failed (attempt 1 of 3; retry in 30 s)"


def test_a_timeout_says_what_the_device_was_doing():
    t = TargetView("a", 0, T.DOWNLOADING, attempts=1, state_deadline=NOW, manifest_id="m",
                   artifact_kind="delta", artifact_bytes=120 * KIB)
    (d,) = of(SetTarget, engine.step(snap([t], [device("a")]), NOW))
    assert d.state == T.HELD
    assert d.reason.startswith("failed: timed out after 600 s in state downloading: "
                               "downloading the delta (120.0 KiB)")


def test_an_abort_names_each_device_activity_and_whether_it_was_offline():
    gone = datetime(2026, 12, 2, 4, 55, 1, tzinfo=UTC)
    targets = [TargetView("p", 0, T.PENDING), TargetView("t", 0, T.TRIAL, manifest_id="m"),
               TargetView("n", 0, T.NOTIFIED, manifest_id="m")]
    devices = [device("p", online=False, seen=gone), device("t"), device("n", online=False,
                                                                         seen=gone)]
    out = engine.step(snap(targets, devices, state=R.ABORTING), NOW)
    reasons = {d.device_id: d.reason for d in of(SetTarget, out)}
    assert reasons == {
        "p": "rollout aborted while the device was not sent the update yet (pending), "
             "offline since 2026-12-02 04:55:01 UTC",
        "t": "rollout aborted while the device was in its health trial of v2; it was not "
             "stopped and may end on v2",
        "n": "rollout aborted while the device was notified (manifest sent, no progress "
             "reported), offline since 2026-12-02 04:55:01 UTC; manifest withdrawn"}


def test_devices_taken_over_are_not_counted_as_devices_that_did_not_update():
    targets = [TargetView("a", 0, T.HEALTHY), TargetView("b", 0, T.CANCELLED),
               TargetView("c", 0, T.FAILED)]
    (sr,) = of(SetRollout, engine.step(snap(targets, [], policy=replace(
        POLICY, max_failure_pct=100.0)), NOW))
    assert sr.reason == "1 device(s) did not update; 1 taken over by a newer rollout"
