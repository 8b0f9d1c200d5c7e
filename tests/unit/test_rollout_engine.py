"""The rollout engine without a broker or a database: the state tables and their one setter,
and ``engine.step`` / ``engine.on_event`` fed frozen snapshots, checked decision by decision."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest

from deltafleet.server.planner import DeltaOption, FullArtifact, RunningModel, VariantOption
from deltafleet.server.policy import RolloutPolicy, assign_waves
from deltafleet.server.rollout import engine, states
from deltafleet.server.rollout.engine import (
    AddTarget,
    Audit,
    BuildDelta,
    DeviceView,
    Dispatch,
    OpenWave,
    RecordVariant,
    Report,
    RollbackOption,
    RolloutView,
    SetReason,
    SetRollout,
    SetTarget,
    Snapshot,
    TargetView,
    Withdraw,
)
from deltafleet.server.rollout.states import (
    ACTIONS,
    ROLLOUT_TRANSITIONS,
    SUPERSEDABLE_STATES,
    TARGET_TRANSITIONS,
    TERMINAL_STATES,
    IllegalTransition,
    RolloutState,
    TargetState,
    transition,
    transition_rollout,
)

T, R = TargetState, RolloutState
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
V1, V2, ZV2, DELTA = "1" * 64, "2" * 64, "3" * 64, "4" * 64
OPT = VariantOption(7, "default", "onnx", "fp32", V2, 1000,
                    compressed=FullArtifact("zstd", ZV2, 800))
OLD = VariantOption(6, "default", "onnx", "fp32", V1, 1000)
ONNX = {"onnxruntime": "1.20"}
POLICY = RolloutPolicy(max_failure_pct=20.0, max_attempts=3, retry_backoff_s=30,
                       state_timeout_s=600, health_window_s=60)


# -- the tables and the one setter ---------------------------------------------------------------
@dataclass
class Row:
    state: str
    reason: str = ""
    updated_at: datetime = NOW
    state_deadline: datetime | None = None
    state_reason: str = ""


def test_state_values_are_the_strings_stored_and_printed():
    assert {s.value for s in T} == {
        "pending", "notified", "downloading", "applying", "trial", "healthy", "held", "failed",
        "rejected", "rolled_back", "skipped", "cancelled", "reverting", "reverted"}
    assert {s.value for s in R} == {
        "running", "paused", "aborting", "aborted", "rolling_back", "rolled_back", "completed",
        "superseded"}
    assert set(TARGET_TRANSITIONS) == set(T) and set(ROLLOUT_TRANSITIONS) == set(R)


LEGAL_TARGET = [(a, b) for a, nxt in TARGET_TRANSITIONS.items() for b in nxt]
ILLEGAL_TARGET = [(a, b) for a in T for b in T
                  if b not in TARGET_TRANSITIONS[a] and not (a == b and TARGET_TRANSITIONS[a])]


@pytest.mark.parametrize(("src", "dst"), LEGAL_TARGET)
def test_every_legal_target_move_is_taken_with_reason_and_deadline(src, dst):
    row = Row(src)
    transition(row, dst, "why", NOW + timedelta(seconds=1), timeout_s=60)
    assert (row.state, row.reason, row.updated_at) == (dst, "why", NOW + timedelta(seconds=1))
    assert row.state_deadline == NOW + timedelta(seconds=61)
    assert type(row.state) is str


@pytest.mark.parametrize(("src", "dst"), ILLEGAL_TARGET)
def test_every_illegal_target_move_is_refused_and_nothing_changes(src, dst):
    row = Row(src, "before")
    with pytest.raises(IllegalTransition):
        transition(row, dst, "why", NOW)
    assert (row.state, row.reason) == (src, "before")


def test_unknown_states_are_refused_as_project_errors():
    from deltafleet.server.errors import ServerError

    with pytest.raises(ServerError):
        transition(Row("pending"), "exploded", "", NOW)
    with pytest.raises(ServerError):
        transition_rollout(Row("running"), "half-done", "", NOW)


@pytest.mark.parametrize("state", [s for s in T if TARGET_TRANSITIONS[s]])
def test_re_entering_a_non_final_state_updates_only_reason_and_deadline(state):
    row = Row(state, state_deadline=NOW)
    transition(row, state, "waiting on the device: disk", NOW)
    assert (row.state, row.reason, row.state_deadline) == (state, "waiting on the device: disk",
                                                           None)


@pytest.mark.parametrize("state", [T.SKIPPED, T.CANCELLED, T.REVERTED])
def test_final_target_states_go_nowhere(state):
    for to in T:
        with pytest.raises(IllegalTransition):
            transition(Row(state), to, "", NOW)


@pytest.mark.parametrize(("src", "dst"), [(a, b) for a in R for b in R])
def test_rollout_moves_follow_the_table(src, dst):
    row = Row(src)
    if dst in ROLLOUT_TRANSITIONS[src]:
        transition_rollout(row, dst, "why", NOW)
        assert (row.state, row.state_reason) == (dst, "why")
    else:
        with pytest.raises(IllegalTransition):
            transition_rollout(row, dst, "why", NOW)
        assert row.state == src


@pytest.mark.parametrize("name", sorted(ACTIONS))
def test_operator_actions_are_moves_of_the_table(name):
    act = ACTIONS[name]
    assert act.allowed and all(act.to in ROLLOUT_TRANSITIONS[s] for s in act.allowed)
    assert act.to in act.already and not act.allowed & act.already


def test_supersede_is_legal_from_every_supersedable_rollout_and_cancels_every_open_target():
    for state in SUPERSEDABLE_STATES:
        transition_rollout(Row(state), R.SUPERSEDED, "a newer rollout", NOW)
    for state in set(T) - TERMINAL_STATES:
        row = Row(state)
        transition(row, T.CANCELLED, "superseded by a newer rollout", NOW)
        assert row.state == "cancelled"


def _docstring_moves(block: str) -> set[tuple[str, str]]:
    moves: set[tuple[str, str]] = set()
    sources: list[str] = []
    for line in block.splitlines():
        text = line.strip()
        if not text or text.endswith("final"):
            continue
        left, arrow, right = text.partition("->")
        if left.strip():
            sources = [s.strip() for s in left.split("|")]
        if arrow:
            targets = re.split(r"\s{2,}", right.strip())[0]
            moves |= {(s, t.strip()) for s in sources for t in targets.split("|")}
    return {(a, b) for a, b in moves if a != b}


def test_the_module_docstring_says_what_the_tables_say():
    doc = states.__doc__ or ""
    target_block = doc.split("Target (per device) moves::")[1].split("Re-entering")[0]
    rollout_block = doc.split("Rollout moves::")[1].split("Operator actions")[0]
    assert _docstring_moves(target_block) == {(a.value, b.value) for a, b in LEGAL_TARGET}
    assert _docstring_moves(rollout_block) == {
        (a.value, b.value) for a, nxt in ROLLOUT_TRANSITIONS.items() for b in nxt}


def test_the_pure_core_imports_no_sqlalchemy_and_no_paho():
    code = ("import sys, deltafleet.server.rollout.engine, deltafleet.server.rollout.states; "
            "bad = [m for m in ('sqlalchemy', 'paho') if m in sys.modules]; "
            "sys.exit(', '.join(bad) or None)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr


# -- snapshots ---------------------------------------------------------------------------------
def device(i: str, *, online: bool = True, runs: str | None = V1, in_group: bool = True,
           runtimes: dict[str, str] | None = None) -> DeviceView:
    return DeviceView(i, online, ONNX if runtimes is None else runtimes,
                      RunningModel(runs, "default", "v1") if runs else None, in_group)


def target(i: str, state: T = T.PENDING, **kw) -> TargetView:
    kw.setdefault("wave", 0)
    return TargetView(i, state=state, **kw)


def snap(targets, devices=None, *, policy: RolloutPolicy = POLICY, state: R = R.RUNNING,
         wave: int = 0, acknowledged: int = 0, deltas=None, failed=None, previous=None,
         bad: dict[str, str] | None = None) -> Snapshot:
    devices = devices if devices is not None else [device(t.device_id) for t in targets]
    bad = bad or {}
    return Snapshot(
        RolloutView(1, state, policy, "v2", wave, acknowledged, "why"), tuple(targets),
        {d.device_id: d for d in devices}, (OPT,),
        {(V1, V2): DeltaOption("bsdiff", DELTA, 100)} if deltas is None else deltas,
        failed or {}, previous or {}, bad.get)


def of(kind, decisions):
    return [d for d in decisions if isinstance(d, kind)]


def sets(decisions) -> dict[str, tuple[str, str]]:
    return {d.device_id: (d.state, d.reason) for d in of(SetTarget, decisions)}


# -- dispatch ----------------------------------------------------------------------------------
def test_pending_target_gets_the_delta_with_its_base_and_first_attempt_recorded():
    out = engine.step(snap([target("a")]), NOW)
    (d,) = of(Dispatch, out)
    assert (d.device_id, d.state, d.kind, d.codec, d.artifact_sha256, d.artifact_bytes,
            d.base_sha256, d.attempts, d.timeout_s) == ("a", T.NOTIFIED, "delta", "bsdiff",
                                                        DELTA, 100, V1, 1, 600)
    (rec,) = of(RecordVariant, out)
    assert rec.option == OPT and rec.record_previous and rec.previous.sha256 == V1


@pytest.mark.parametrize(("dev", "expect"), [
    (device("a", runtimes={"litert": "2"}), (T.SKIPPED, "no variant")),
    (device("a", runs=V2), (T.HEALTHY, "device already runs the target")),
])
def test_targets_that_need_nothing_are_settled_without_a_manifest(dev, expect):
    out = engine.step(snap([target("a")], [dev]), NOW)
    assert not of(Dispatch, out)
    state, reason = sets(out)["a"]
    assert state == expect[0] and expect[1] in reason


def test_a_missing_delta_is_built_first_and_the_target_waits_without_an_attempt():
    out = engine.step(snap([target("a")], deltas={}), NOW)
    assert of(BuildDelta, out) == [BuildDelta(V1, V2, 800)]
    assert of(SetReason, out) == [SetReason("a", "building delta")]
    assert not of(Dispatch, out) and not of(SetTarget, out)


def test_a_pair_no_delta_could_be_built_for_gets_the_compressed_full_artifact():
    out = engine.step(snap([target("a")], deltas={}, failed={(V1, V2): "no gain"}), NOW)
    (d,) = of(Dispatch, out)
    assert (d.kind, d.codec, d.artifact_sha256, d.base_sha256) == ("full", "zstd", ZV2, None)


def test_max_concurrent_counts_devices_already_in_flight():
    policy = replace(POLICY, max_concurrent=2)
    targets = [target("a", T.DOWNLOADING), target("b"), target("c")]
    out = engine.step(snap(targets, policy=policy), NOW)
    assert [d.device_id for d in of(Dispatch, out)] == ["b"]


def test_a_device_that_joined_the_group_gets_a_target_in_the_current_wave_and_is_dispatched():
    out = engine.step(snap([target("a", T.HEALTHY, wave=1)], [device("a"), device("new")],
                           policy=replace(POLICY, canary="1"), wave=1), NOW)
    assert of(AddTarget, out) == [AddTarget("new", 1, "joined the group during the rollout")]
    assert [d.device_id for d in of(Dispatch, out)] == ["new"]
    out = engine.step(snap([target("a")], [device("a"), device("x", in_group=False)]), NOW)
    assert not of(AddTarget, out)


# -- waves and thresholds ----------------------------------------------------------------------
CANARY = replace(POLICY, canary="1", waves=(100.0,), max_failure_pct=5.0)


def canary_targets(canary_state: T, rest: T = T.PENDING) -> list[TargetView]:
    waves = assign_waves(["d0", "d1", "d2"], CANARY)
    assert waves == {"d0": 0, "d1": 1, "d2": 1}
    return [target(i, canary_state if w == 0 else rest, wave=w, attempts=1,
                   manifest_id="m" if w == 0 else None) for i, w in waves.items()]


def test_only_the_canary_is_dispatched_until_it_proves_the_version():
    out = engine.step(snap(canary_targets(T.PENDING), policy=CANARY), NOW)
    assert [d.device_id for d in of(Dispatch, out)] == ["d0"] and not of(OpenWave, out)
    out = engine.step(snap(canary_targets(T.TRIAL), policy=CANARY), NOW)
    assert not of(Dispatch, out) and not of(OpenWave, out)


def test_a_healthy_canary_opens_the_next_wave_and_it_is_dispatched_in_the_same_tick():
    out = engine.step(snap(canary_targets(T.HEALTHY), policy=CANARY), NOW)
    assert of(OpenWave, out) == [OpenWave(1)]
    assert sorted(d.device_id for d in of(Dispatch, out)) == ["d1", "d2"]


@pytest.mark.parametrize(("on_failure", "to"), [
    ("pause", R.PAUSED), ("abort", R.ABORTING), ("rollback", R.ROLLING_BACK)])
@pytest.mark.parametrize("failure", [T.HELD, T.FAILED, T.REJECTED, T.ROLLED_BACK])
def test_a_failed_canary_breaches_the_threshold_and_stops_dispatch(on_failure, to, failure):
    policy = replace(CANARY, on_failure=on_failure)
    out = engine.step(snap(canary_targets(failure), policy=policy), NOW)
    (sr,) = of(SetRollout, out)
    assert sr.state == to and sr.reason == "1 of 1 devices failed, more than the 5% allowed"
    assert of(Audit, out) == [Audit(f"rollout.{on_failure}",
                                    {"reason": sr.reason, "automatic": True})]
    assert not of(Dispatch, out) and not of(OpenWave, out)


@pytest.mark.parametrize(("failures", "acknowledged", "breached"), [
    (1, 0, False), (2, 0, False), (3, 0, True), (3, 1, False), (3, 3, False)])
def test_failure_threshold_is_a_share_of_the_devices_dispatched_minus_acknowledged(
        failures, acknowledged, breached):
    targets = ([target(f"f{i}", T.FAILED) for i in range(failures)]
               + [target(f"h{i}", T.HEALTHY) for i in range(10 - failures)]
               + [target("s", T.SKIPPED)])  # skipped devices count for nothing
    out = engine.step(snap(targets, acknowledged=acknowledged), NOW)
    assert bool(of(SetRollout, out) and of(SetRollout, out)[0].state == R.PAUSED) is breached


def test_a_wave_of_offline_devices_waits_but_one_healthy_device_settles_the_rest():
    policy = replace(POLICY, canary="2", waves=(100.0,))
    offline = [device("a", online=False), device("b", online=False), device("c")]
    waiting = [target("a", T.NOTIFIED, attempts=1), target("b", T.NOTIFIED, attempts=1),
               target("c", wave=1)]
    assert not of(OpenWave, engine.step(snap(waiting, offline, policy=policy), NOW))
    proven = [replace(waiting[0], state=T.HEALTHY), *waiting[1:]]
    assert of(OpenWave, engine.step(snap(proven, offline, policy=policy), NOW)) == [OpenWave(1)]


def test_the_rollout_completes_when_every_wave_is_open_and_every_target_terminal():
    targets = [target("a", T.HEALTHY), target("b", T.FAILED), target("c", T.SKIPPED)]
    (sr,) = of(SetRollout, engine.step(snap(targets, acknowledged=1), NOW))
    assert (sr.state, sr.reason, sr.finished) == (R.COMPLETED, "1 device(s) did not update", True)
    still = [*targets, target("d", T.TRIAL)]
    assert not of(SetRollout, engine.step(snap(still, acknowledged=1), NOW))


# -- failures, holds and expiry ----------------------------------------------------------------
@pytest.mark.parametrize(("attempts", "state", "hold_s"), [
    (1, T.HELD, 30), (2, T.HELD, 60), (3, T.FAILED, None), (3, T.REJECTED, None)])
def test_a_failing_device_is_held_with_a_doubling_backoff_then_held_out(attempts, state, hold_s):
    t = target("a", T.TRIAL, attempts=attempts)
    reported = T.FAILED if state == T.HELD else state
    (d,) = engine.on_event(t, POLICY, Report(reported, "p95 too high", {"p95_us": 9}), NOW)
    assert d.state == state and d.health == {"p95_us": 9}
    if hold_s is None:
        assert d.hold_until is None and d.reason == (
            f"p95 too high (in its health trial; held out after {attempts} failed attempts)")
    else:
        assert d.hold_until == NOW + timedelta(seconds=hold_s)
        assert d.reason == (f"failed in its health trial: p95 too high (attempt {attempts} "
                            f"of 3; retry in {hold_s} s)")


def test_a_hold_that_ran_out_goes_back_to_pending_and_is_dispatched_again():
    held = target("a", T.HELD, attempts=1, reason="failed: x", hold_until=NOW)
    out = engine.step(snap([held], acknowledged=1), NOW)
    assert of(SetTarget, out)[0] == SetTarget("a", T.PENDING, "retrying after: failed: x")
    (d,) = of(Dispatch, out)
    assert d.attempts == 2 and not of(RecordVariant, out)[0].record_previous
    still = replace(held, hold_until=NOW + timedelta(seconds=1))
    assert not engine.step(snap([still], acknowledged=1), NOW)


PAST = NOW - timedelta(seconds=1)


@pytest.mark.parametrize(("state", "online", "expect"), [
    (T.NOTIFIED, False, None),  # offline devices converge when they come back
    (T.NOTIFIED, True, T.HELD),
    (T.DOWNLOADING, False, T.HELD),
    (T.TRIAL, True, T.HELD),
    (T.REVERTING, False, None),
    (T.REVERTING, True, T.FAILED),
])
def test_deadlines_expire_except_for_devices_that_never_got_the_manifest(state, online, expect):
    rollout_state = R.ROLLING_BACK if state == T.REVERTING else R.PAUSED
    t = target("a", state, attempts=1, state_deadline=PAST, manifest_id="m",
               artifact_sha256=DELTA, previous_sha256=V1)
    out = engine.step(snap([t], [device("a", online=online)], state=rollout_state,
                           previous={V1: RollbackOption("v1", OLD)}), NOW)
    got = sets(out).get("a")
    if expect is None:
        assert got is None
    else:
        assert got is not None and got[0] == expect and "timed out" in got[1]


def test_a_device_waiting_on_its_disk_keeps_its_state_without_deadline_or_attempt():
    t = target("a", T.DOWNLOADING, attempts=1, state_deadline=NOW)
    (d,) = engine.on_event(t, POLICY, Report("waiting", "needs 2 MiB more disk"), NOW)
    assert d == SetTarget("a", T.DOWNLOADING, "waiting on the device: needs 2 MiB more disk")
    assert d.attempts is None and d.timeout_s is None


@pytest.mark.parametrize(("current", "report", "expect"), [
    (T.NOTIFIED, T.DOWNLOADING, (T.DOWNLOADING, 600)),
    (T.NOTIFIED, T.TRIAL, (T.TRIAL, 660)),  # the trial window is added to its deadline
    (T.TRIAL, T.DOWNLOADING, None),  # a late report never moves a target back
    (T.APPLYING, T.APPLYING, None),
    (T.TRIAL, T.HEALTHY, (T.HEALTHY, None)),
])
def test_progress_only_moves_forward(current, report, expect):
    out = engine.on_event(target("a", current), POLICY, Report(report), NOW)
    assert [(d.state, d.timeout_s) for d in out] == ([] if expect is None else [expect])


def test_a_blob_gone_bad_while_fetched_takes_the_target_back_and_returns_its_attempt():
    t = target("a", T.DOWNLOADING, attempts=2, manifest_id="m", artifact_sha256=DELTA)
    out = engine.step(snap([t], bad={DELTA: "corrupt: it hashes to 0000"}), NOW)
    back = of(SetTarget, out)[0]
    assert back == SetTarget("a", T.PENDING, f"held: server blob {DELTA[:12]} corrupt (store)",
                             attempts=1, forget_manifest=True)
    assert not of(Dispatch, out)
    again = target("a", attempts=1, artifact_sha256=DELTA)  # the next tick plans it again
    (d,) = of(Dispatch, engine.step(snap([again], bad={DELTA: "corrupt"}), NOW))
    assert (d.kind, d.codec, d.artifact_sha256, d.attempts) == ("full", "zstd", ZV2, 2)


# -- abort and rollback ------------------------------------------------------------------------
def test_abort_withdraws_undelivered_manifests_and_cancels_what_has_not_finished():
    targets = [target("p"), target("n", T.NOTIFIED), target("d", T.DOWNLOADING),
               target("h", T.HEALTHY)]
    out = engine.step(snap(targets, state=R.ABORTING), NOW)
    assert of(Withdraw, out) == [Withdraw("n"), Withdraw("d")]  # the agent drops a download
    aborted = "rollout aborted while the device was"
    assert sets(out) == {
        "p": (T.CANCELLED, f"{aborted} not sent the update yet (pending)"),
        "n": (T.CANCELLED, f"{aborted} notified (manifest sent, no progress reported); "
                           "manifest withdrawn"),
        "d": (T.CANCELLED, f"{aborted} downloading the artifact; manifest withdrawn, download "
                           "stopped: it keeps the version it runs")}
    assert of(SetRollout, out) == [SetRollout(R.ABORTED, "why", True)]


def test_rollback_sends_every_touched_device_the_model_it_ran_before():
    targets = [
        target("h", T.HEALTHY, attempts=1, manifest_id="m1", previous_sha256=V1),
        target("p"),  # never got a manifest
        target("fresh", T.FAILED, attempts=3, manifest_id="m2"),  # ran nothing before
        target("gone", T.HEALTHY, attempts=1, manifest_id="m3", previous_sha256="9" * 64),
        target("r", T.REVERTED, manifest_id="m4", previous_sha256=V1),
    ]
    out = engine.step(snap(targets, state=R.ROLLING_BACK,
                           previous={V1: RollbackOption("v1", OLD)}), NOW)
    (d,) = of(Dispatch, out)
    assert (d.device_id, d.state, d.option, d.version, d.kind, d.codec, d.artifact_sha256,
            d.base_sha256, d.attempts) == ("h", T.REVERTING, OLD, "v1", "full", "identity", V1,
                                           None, 1)
    assert of(Withdraw, out) == [Withdraw("fresh")]
    got = sets(out)
    assert got["p"] == (T.CANCELLED, "rollout rolled back before this device")
    assert got["fresh"][0] == T.FAILED and "nothing to roll back to" in got["fresh"][1]
    assert got["gone"] == (T.FAILED, "the previous model is not in the catalog")
    assert not of(SetRollout, out)  # "h" is reverting


def test_rollback_waits_for_a_bad_blob_and_ends_when_no_device_is_reverting():
    t = target("h", T.HEALTHY, attempts=1, manifest_id="m", previous_sha256=V1)
    out = engine.step(snap([t], state=R.ROLLING_BACK, previous={V1: RollbackOption("v1", OLD)},
                           bad={V1: "missing"}), NOW)
    assert of(SetReason, out) == [SetReason("h", f"held: server blob {V1[:12]} missing (store)")]
    assert not of(SetRollout, out) and not of(Dispatch, out)
    done = [target("a", T.REVERTED), target("b", T.FAILED, manifest_id=None)]
    out = engine.step(snap(done, state=R.ROLLING_BACK), NOW)
    assert of(SetRollout, out) == [SetRollout(R.ROLLED_BACK, "why", True)]


@pytest.mark.parametrize(("report", "expect"), [
    (T.HEALTHY, (T.REVERTED, "back on the version it ran before")),
    (T.FAILED, (T.FAILED, "rollback failed: boom")),
    (T.DOWNLOADING, None),
])
def test_a_report_on_a_rollback_decides_it(report, expect):
    out = engine.on_event(target("a", T.REVERTING), POLICY, Report(report, "boom"), NOW)
    assert [(d.state, d.reason) for d in out] == ([] if expect is None else [expect])


def test_a_paused_rollout_dispatches_nothing():
    assert not of(Dispatch, engine.step(snap([target("a")], state=R.PAUSED), NOW))


def test_the_engine_refuses_a_move_the_table_does_not_allow():
    with pytest.raises(IllegalTransition):
        engine.on_event(target("a", T.CANCELLED), POLICY, Report(T.HEALTHY), NOW)


# -- counters: a partial snapshot decides what a whole one does --------------------------------
def partial(s: Snapshot, now: datetime) -> Snapshot:
    """What the SQL adapter loads: the counters, the due targets, the pending targets of the
    open waves up to the budget, and what the rollout's state works on."""
    state, wave, policy = s.rollout.state, s.rollout.current_wave, s.rollout.policy
    online = {i for i, d in s.devices.items() if d.online}
    keep: dict[str, TargetView] = {}
    for t in s.targets:
        due = ((t.state == T.HELD and t.hold_until is not None and t.hold_until <= now)
               or (t.state in states.IN_FLIGHT_STATES and t.state_deadline is not None
                   and t.state_deadline <= now
                   and (t.device_id in online or t.state not in (T.NOTIFIED, T.REVERTING))))
        if (state == R.ABORTING and t.state not in TERMINAL_STATES) or (
                state != R.ABORTING and due) or (
                state == R.ROLLING_BACK
                and t.state not in (T.REVERTING, T.REVERTED, T.SKIPPED, T.CANCELLED)) or (
                state in (R.RUNNING, R.PAUSED) and t.state in (T.NOTIFIED, T.DOWNLOADING)
                and t.artifact_sha256 and s.blob_problem(t.artifact_sha256)):
            keep[t.device_id] = t
    counts = engine.count_targets(s.targets)
    if state == R.RUNNING:
        in_flight = sum(n for (_, st), n in counts.items() if st in states.IN_FLIGHT_STATES)
        budget = (None if policy.max_concurrent is None
                  else max(0, policy.max_concurrent - in_flight + len(keep)))
        pending = sorted((t for t in s.targets if t.state == T.PENDING and t.wave <= wave
                          and t.device_id in online),  # offline devices wait
                         key=lambda t: (t.wave, t.device_id))
        for t in pending[:budget]:
            keep.setdefault(t.device_id, t)
    members = {st for (w, st), n in counts.items() if w == wave and n}
    waiting = {}
    if T.HEALTHY in members and members - states.VERDICT_STATES:
        waiting[wave] = engine.count_waiting_online(s.targets, s.devices).get(wave, 0)
    devices = {i: d for i, d in s.devices.items()
               if i in keep or i not in {t.device_id for t in s.targets}}
    return replace(s, targets=tuple(keep.values()), devices=devices, counts=counts,
                   waiting_online=waiting)


def _random_world(rng, n: int) -> tuple[list[TargetView], list[DeviceView]]:
    targets, devices = [], []
    for i in range(n):
        st = rng.choice([T.PENDING] * 4 + list(T))
        targets.append(target(
            f"d{i:02d}", st, wave=rng.randrange(3), attempts=rng.randrange(3),
            hold_until=NOW + timedelta(seconds=rng.choice([-5, 5])),
            state_deadline=(NOW + timedelta(seconds=rng.choice([-5, 5]))
                            if st in states.IN_FLIGHT_STATES else None),
            manifest_id=rng.choice([None, "m"]), artifact_sha256=rng.choice([None, DELTA]),
            previous_sha256=rng.choice([None, V1])))
        devices.append(device(f"d{i:02d}", online=rng.random() < 0.7))
    devices.append(device("joiner"))
    return targets, devices


def _apply_world(world: dict[str, TargetView], counts: dict, out) -> None:
    """Apply decisions to the world and count the moves, as the flush hook does."""
    for d in out:
        if isinstance(d, AddTarget):
            world[d.device_id] = target(d.device_id, wave=d.wave)
            counts[(d.wave, T.PENDING.value)] = counts.get((d.wave, T.PENDING.value), 0) + 1
        elif isinstance(d, SetTarget | Dispatch):
            t = world[d.device_id]
            counts[(t.wave, t.state.value)] -= 1
            counts[(t.wave, d.state.value)] = counts.get((t.wave, d.state.value), 0) + 1
            world[d.device_id] = replace(t, state=d.state, state_deadline=None,
                                         hold_until=None)


@pytest.mark.parametrize("seed", range(40))
def test_a_partial_snapshot_decides_what_the_whole_one_does_and_counters_match(seed):
    import random

    rng = random.Random(seed)
    policy = replace(POLICY, canary="3", waves=(50.0, 100.0),
                     max_concurrent=rng.choice([None, 2, 5]),
                     max_failure_pct=rng.choice([20.0, 60.0]),
                     on_failure=rng.choice(["pause", "abort", "rollback"]))
    targets, devices = _random_world(rng, 20)
    world = {t.device_id: t for t in targets}
    counts = engine.count_targets(targets)
    rstate = rng.choice([R.RUNNING, R.RUNNING, R.PAUSED, R.ABORTING, R.ROLLING_BACK])
    for _ in range(6):
        whole = snap(list(world.values()), devices, policy=policy, state=rstate,
                     wave=rng.randrange(3), previous={V1: RollbackOption("v1", OLD)},
                     bad=rng.choice([{}, {DELTA: "corrupt"}]))
        part = partial(whole, NOW)
        assert part.counts == {k: v for k, v in counts.items() if v}
        got, want = engine.step(part, NOW), engine.step(whole, NOW)
        assert sorted(map(repr, got)) == sorted(map(repr, want))
        _apply_world(world, counts, want)
        assert {k: v for k, v in counts.items() if v} == engine.count_targets(world.values())
        for t in rng.sample(list(world.values()), 3):  # device events move targets too
            report = Report(rng.choice(["downloading", "trial", "healthy", "failed"]), "x")
            with contextlib.suppress(IllegalTransition):  # a report the table refuses
                _apply_world(world, counts, engine.on_event(t, policy, report, NOW))
        assert {k: v for k, v in counts.items() if v} == engine.count_targets(world.values())
        if rng.random() < 0.3:
            rstate = rng.choice([R.RUNNING, R.PAUSED, R.ROLLING_BACK])


# -- selection in dispatch (--prefer) ---------------------------------------------------------
INT8 = VariantOption(8, "int8", "onnx", "int8", "5" * 64, 300)


def selecting(memory_bytes: int, measured: dict[str, tuple[int, int]]):
    """A ``Selecting`` for a device with this much memory and these (p50_us, rss) per sha."""
    from deltafleet.server.planner import Selecting
    from deltafleet.server.selection import DeviceFacts, Figures, Objective, variant_facts

    facts = {o.variant_id: variant_facts(o, {}) for o in (OPT, INT8)}
    own = {sha: Figures(p50, p50 * 2, 1, rss) for sha, (p50, rss) in measured.items()}
    return Selecting(DeviceFacts("x", "edge", ONNX, frozenset({"cpu"}), memory_bytes, 1 << 34),
                     facts, Objective("latency"), own, {})


def test_with_prefer_dispatch_sends_the_variant_selection_chose():
    measured = {V2: (100, 40 << 20), INT8.sha256: (300, 10 << 20)}
    big = replace(device("big"), selecting=selecting(8 << 30, measured))
    small = replace(device("small"), selecting=selecting(20 << 20, measured))
    s = replace(snap([target("big"), target("small")], [big, small]),
                options=(OPT, INT8))
    out = engine.step(s, NOW)
    assert {d.device_id: d.option.name for d in of(Dispatch, out)} == {
        "big": "default", "small": "int8"}
    assert {d.device_id: d.kind for d in of(Dispatch, out)} == {"big": "delta", "small": "full"}


def test_a_device_no_variant_fits_is_skipped_with_the_selections_reason_and_never_notified():
    tiny = replace(device("tiny"), selecting=selecting(4 << 20, {V2: (100, 40 << 20),
                                                                 INT8.sha256: (300, 10 << 20)}))
    out = engine.step(replace(snap([target("tiny")], [tiny]), options=(OPT, INT8)), NOW)
    assert not of(Dispatch, out)
    state, reason = sets(out)["tiny"]
    assert state == T.SKIPPED and "memory" in reason


def test_a_pinned_variant_wins_over_selection():
    small = replace(device("small"), selecting=selecting(20 << 20, {
        V2: (100, 40 << 20), INT8.sha256: (300, 10 << 20)}))
    s = replace(snap([target("small")], [small], policy=replace(POLICY, variant="default")),
                options=(OPT, INT8))
    (d,) = of(Dispatch, engine.step(s, NOW))
    assert d.option.name == "default"
