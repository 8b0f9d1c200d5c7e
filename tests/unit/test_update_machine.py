"""The pure update machine, table-driven: events in, concrete effects out; no broker, no disk."""

from __future__ import annotations

import base64
import subprocess
import sys
from dataclasses import replace
from itertools import product

import pytest

from deltafleet.agent import machine as mc
from deltafleet.agent.machine import P
from deltafleet.agent.trial import Verdict
from deltafleet.shared import ArtifactRef, Manifest

OLD, NEW, ART = "a" * 64, "b" * 64, "c" * 64
RAW = b"signed-envelope"
RUNNING = mc.Device(mc.Running(OLD, "m-1"))
CFG = mc.MachineConfig(download_timeout_s=100, chunk_retry_s=3, disk_retry_s=30,
                       disk_margin_bytes=0, max_artifact_bytes=1 << 20, max_trial_restarts=1)


def manifest(mid: str = "m-2", *, serial: int = 2, target: str = NEW, art: str = ART,
             window: int = 10, kind: str = "full") -> Manifest:
    return Manifest(
        manifest_id=mid, device_id="dev-1", serial=serial, issued_at=0, expires_at=10**10,
        rollout_id=1, model="det", version=f"v{serial}", variant="default", format="onnx",
        target_sha256=target, target_size_bytes=100, base_sha256=OLD if kind == "delta" else None,
        artifact=ArtifactRef(kind, "identity", art, 200, 100, ("d" * 64, "e" * 64)),
        trial_window_s=window)


M = manifest()


def quiet(effects: list) -> list:
    return [e for e in effects if not isinstance(e, mc.Log)]


def inspected(m: Manifest = M, *, on_disk: bool = False, refusal: str | None = None,
              free: int = 1 << 20, now: float = 0.0) -> mc.Inspected:
    return mc.Inspected("det", m.manifest_id, on_disk, refusal, free, 0, 0, now)


def to_checking(sm: mc.UpdateMachine, m: Manifest = M, device: mc.Device = RUNNING) -> list:
    sm.handle(mc.ManifestVerified("det", m, RAW, device))
    return sm.handle(mc.SerialNoted("det", m.manifest_id))


def to_downloading(sm: mc.UpdateMachine, m: Manifest = M, now: float = 0.0) -> None:
    to_checking(sm, m)
    sm.handle(inspected(m, now=now))
    sm.handle(mc.DownloadOpened("det", m.manifest_id, 0, 0, False, now))


def to_trial(sm: mc.UpdateMachine, m: Manifest = M, now: float = 0.0) -> None:
    to_downloading(sm, m)
    sm.handle(mc.DownloadComplete("det", m.manifest_id, 200, 0))
    sm.handle(mc.Staged("det", m.manifest_id))
    sm.handle(mc.SwapDone("det", m.manifest_id))
    sm.handle(mc.TrialReady("det", m.manifest_id, now))


# -- the table ---------------------------------------------------------------------------
def record(rec: dict, step: str, **extra) -> dict:
    return {**rec, "step": step, **extra}


JOURNAL = {"manifest": base64.b64encode(RAW).decode(), "manifest_id": "m-2",
           "target_sha256": NEW, "previous_sha256": OLD}


def restart(sm: mc.UpdateMachine, step: str, current: str = NEW, **extra) -> None:
    sm.handle(mc.Restarted((mc.JournalEntry("det", record(JOURNAL, step, **extra), M, current,
                                            True),)))
    sm.handle(mc.Resumed(wall_now=0.0))


SCENARIOS = {
    (P.IDLE, P.CHECKING): lambda sm: to_checking(sm),
    (P.CHECKING, P.DOWNLOADING): lambda sm: to_downloading(sm),
    (P.CHECKING, P.APPLYING): lambda sm: (to_checking(sm), sm.handle(inspected(on_disk=True))),
    (P.CHECKING, P.IDLE): lambda sm: (to_checking(sm), sm.handle(inspected(free=0))),
    (P.DOWNLOADING, P.CHECKING): lambda sm: (to_downloading(sm),
                                             to_checking(sm, manifest("m-3", serial=3))),
    (P.DOWNLOADING, P.APPLYING): lambda sm: (to_downloading(sm), sm.handle(
        mc.DownloadComplete("det", "m-2", 200, 0))),
    (P.DOWNLOADING, P.IDLE): lambda sm: (to_downloading(sm), sm.handle(mc.Tick(101.0))),
    (P.APPLYING, P.TRIAL): lambda sm: to_trial(sm),
    (P.APPLYING, P.IDLE): lambda sm: (to_checking(sm), sm.handle(inspected(on_disk=True)),
                                      sm.handle(mc.ApplyFailed("det", "m-2", "bad"))),
    (P.TRIAL, P.IDLE): lambda sm: (to_trial(sm), sm.handle(
        mc.TrialVerdict("det", "m-2", Verdict(True, "ok", {})))),
    (P.TRIAL, P.ROLLING_BACK): lambda sm: (to_trial(sm), sm.handle(
        mc.TrialNotLoaded("det", "m-2"))),
    (P.ROLLING_BACK, P.IDLE): lambda sm: (to_trial(sm), sm.handle(
        mc.TrialVerdict("det", "m-2", Verdict(False, "errors", {}))),
        sm.handle(mc.RolledBack("det", "m-2", True, OLD))),
    (P.IDLE, P.TRIAL): lambda sm: restart(sm, "activating"),
    (P.IDLE, P.ROLLING_BACK): lambda sm: restart(sm, "rolling_back"),
}


def test_the_scenarios_cover_the_whole_table() -> None:
    assert set(SCENARIOS) == set(mc.TRANSITIONS)


@pytest.mark.parametrize("move", sorted(SCENARIOS), ids=lambda m: f"{m[0]}->{m[1]}")
def test_every_legal_transition(move: tuple[mc.Phase, mc.Phase],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    sm = mc.UpdateMachine(CFG)
    seen: list[tuple[mc.Phase, mc.Phase]] = []
    real = sm._move

    def spy(model: str, to: mc.Phase, upd=None) -> None:
        seen.append((sm.phase(model), to))
        real(model, to, upd)

    monkeypatch.setattr(sm, "_move", spy)
    SCENARIOS[move](sm)
    assert move in seen
    assert set(seen) <= mc.TRANSITIONS


ILLEGAL = sorted(set(product(mc.Phase, mc.Phase)) - mc.TRANSITIONS)


@pytest.mark.parametrize("move", ILLEGAL, ids=lambda m: f"{m[0]}->{m[1]}")
def test_illegal_moves_are_refused(move: tuple[mc.Phase, mc.Phase]) -> None:
    sm = mc.UpdateMachine(CFG)
    if move[0] is not P.IDLE:
        sm.updates["det"] = mc._Update(M, RAW, RUNNING, phase=move[0])
    with pytest.raises(mc.IllegalTransition):
        sm._move("det", move[1], mc._Update(M, RAW, RUNNING))
    assert issubclass(mc.IllegalTransition, mc.AgentError)


def test_phase_journal_steps_follow_the_journal_table() -> None:
    """Every move into a phase with journal steps is a legal journal step from the one
    before (a new record, after a restart: whatever the record said)."""
    for a, b in mc.TRANSITIONS:
        if not mc.PHASE_STEPS[b] or a is P.IDLE:
            continue
        before = mc.PHASE_STEPS[a] or {None}
        assert any(mc.PHASE_STEPS[b] & mc.JOURNAL_NEXT[s] for s in before), (a, b)


# -- the whole way, effect by effect ---------------------------------------------------------
def test_a_delta_update_from_manifest_to_commit() -> None:
    sm = mc.UpdateMachine(CFG)
    m = manifest(kind="delta")
    assert sm.handle(mc.ManifestVerified("det", m, RAW, RUNNING)) == [
        mc.NoteSerial("det", "m-2", 2)]
    assert sm.handle(mc.SerialNoted("det", "m-2")) == [mc.Inspect("det", m)]
    assert sm.handle(inspected(m)) == [
        mc.JournalBegin("det", "downloading", RAW, "m-2", NEW, OLD), mc.OpenDownload("det", m)]
    assert sm.handle(mc.DownloadOpened("det", "m-2", 1, 100, False, 5.0)) == [
        mc.Subscribe("det", ART), mc.Report("det", m, "downloading", chunks_reused=1),
        mc.RequestChunks("det", ART)]
    assert sm.handle(mc.ChunkAccepted("det", "m-2", 6.0)) == []
    assert sm.handle(mc.DownloadComplete("det", "m-2", 200, 1)) == [
        mc.Unsubscribe("det", ART),
        mc.Report("det", m, "applying", bytes_received=200, chunks_reused=1),
        mc.JournalStep("det", "patching", space_step="apply"), mc.Apply("det", m)]
    assert sm.handle(mc.Staged("det", "m-2")) == [
        mc.CrashPoint("det", "patch"), mc.JournalStep("det", "staged", space_step="apply"),
        mc.CrashPoint("det", "stage"), mc.SwapIn("det", m)]
    assert quiet(sm.handle(mc.SwapDone("det", "m-2"))) == [
        mc.DropDownload("det", ART), mc.CleanDownloads("det", frozenset()),
        mc.JournalStep("det", "trial", trial_window_s=10.0, soft=True),
        mc.Report("det", m, "trial", sha256=NEW, bytes_received=200, chunks_reused=1),
        mc.CrashPoint("det", "trial"), mc.StartTrial("det", m, 10.0)]
    assert sm.handle(mc.TrialReady("det", "m-2", 20.0)) == []
    assert sm.handle(mc.Tick(25.0)) == [mc.Judge("det", "m-2", final=False)]
    assert sm.handle(mc.Tick(30.0)) == [mc.Judge("det", "m-2", final=True)]
    assert sm.in_trial("det")
    v = Verdict(True, "within policy", {"requests": 20}, note="latency off")
    assert quiet(sm.handle(mc.TrialVerdict("det", "m-2", v))) == [
        mc.EndTrial("det"),
        mc.JournalStep("det", "committing",
                       {"verdict": {"reason": "within policy", "figures": {"requests": 20}}},
                       soft=True),
        mc.CrashPoint("det", "commit"),
        mc.Report("det", m, "healthy", sha256=NEW, health={"requests": 20}, reason="latency off"),
        mc.JournalClear("det")]
    assert sm.phase("det") is P.IDLE


def test_a_bad_chunk_is_requested_again_as_a_repair() -> None:
    sm = mc.UpdateMachine(CFG)
    to_downloading(sm)
    assert sm.handle(mc.ChunkBad("det", "m-2", 1, 1.0)) == [
        mc.RequestChunks("det", ART, (1,), repair=True)]


def test_a_complete_download_on_open_goes_straight_to_apply() -> None:
    sm = mc.UpdateMachine(CFG)
    to_checking(sm)
    sm.handle(inspected())
    out = sm.handle(mc.DownloadOpened("det", "m-2", 2, 200, True, 0.0))
    assert out[-1] == mc.Apply("det", M) and sm.phase("det") is P.APPLYING


def test_a_target_already_on_disk_is_swapped_in_without_a_download() -> None:
    sm = mc.UpdateMachine(CFG)
    to_checking(sm)
    assert sm.handle(inspected(on_disk=True)) == [
        mc.JournalBegin("det", "staged", RAW, "m-2", NEW, OLD),
        mc.Report("det", M, "applying", reason="target already on disk"), mc.SwapIn("det", M)]


# -- re-delivery, replay, supersede, already running ---------------------------------------------
def test_re_delivery_of_the_manifest_being_downloaded_does_nothing() -> None:
    sm = mc.UpdateMachine(CFG)
    to_downloading(sm)
    assert "m-2" in sm.known_ids("det", RUNNING)
    assert sm.handle(mc.ManifestVerified("det", M, RAW, RUNNING)) == [
        mc.NoteSerial("det", "m-2", 2)]
    assert sm.handle(mc.SerialNoted("det", "m-2")) == []
    assert sm.phase("det") is P.DOWNLOADING


def test_a_refused_re_delivery_stays_quiet_but_a_replay_is_reported() -> None:
    sm = mc.UpdateMachine(CFG)
    known = sm.handle(mc.ManifestRejected("det", RAW, "expired", "m-1", RUNNING))
    assert quiet(known) == [] and len(known) == 1
    assert quiet(sm.handle(mc.ManifestRejected("det", RAW, "replayed", "m-0", RUNNING))) == [
        mc.ReportRejected("det", "replayed", RAW)]


def test_a_manifest_on_another_models_topic_is_rejected() -> None:
    sm = mc.UpdateMachine(CFG)
    out = sm.handle(mc.ManifestVerified("cam", M, RAW, mc.Device()))
    assert quiet(out) == [mc.ReportRejected("cam", "manifest for det arrived on topic of cam",
                                            RAW)]


def test_the_running_target_under_a_new_manifest_is_adopted_and_reported_healthy() -> None:
    sm = mc.UpdateMachine(CFG)
    m = manifest("m-3", serial=3, target=OLD)
    assert to_checking(sm, m) == [
        mc.Adopt("det", m), mc.Report("det", m, "healthy", sha256=OLD, reason="already running")]
    assert to_checking(sm, manifest("m-1", target=OLD)) == []  # the running manifest itself


def test_a_manifest_marked_failed_is_not_tried_again() -> None:
    sm = mc.UpdateMachine(CFG)
    assert to_checking(sm, M, mc.Device(mc.Running(OLD, "m-1"), failed_id="m-2")) == []


def test_a_newer_manifest_supersedes_the_download() -> None:
    sm = mc.UpdateMachine(CFG)
    to_downloading(sm)
    newer = manifest("m-3", serial=3, art="f" * 64)
    assert quiet(to_checking(sm, newer)) == [
        mc.Unsubscribe("det", ART), mc.ForgetDownload("det"), mc.DropDownload("det", ART),
        mc.Inspect("det", newer)]
    assert sm.known_ids("det", RUNNING) == {"m-1", "m-3"}  # the superseded one is not known


def test_a_manifest_during_a_trial_waits_for_the_verdict() -> None:
    sm = mc.UpdateMachine(CFG)
    to_trial(sm)
    newer = manifest("m-3", serial=3)
    assert to_checking(sm, newer) == []
    assert sm.pending == {"det": ("m-3", RAW)} and "m-3" in sm.known_ids("det", RUNNING)
    out = sm.handle(mc.TrialVerdict("det", "m-2", Verdict(True, "ok", {})))
    assert out[-1] == mc.Reconsider("det", RAW, "pending", "m-3")
    sm.handle(mc.Reconsidered("det", "pending", "m-3"))
    assert sm.pending == {}


# -- failures, timeouts, rollback --------------------------------------------------------------
def test_a_download_times_out() -> None:
    sm = mc.UpdateMachine(CFG)
    to_downloading(sm, now=0.0)
    assert sm.handle(mc.Tick(2.0)) == []
    assert sm.handle(mc.Tick(4.0)) == [mc.RequestChunks("det", ART)]  # stalled: ask again
    assert sm.handle(mc.Tick(8.0, connected=False)) == []
    assert quiet(sm.handle(mc.Tick(101.0))) == [
        mc.JournalClear("det"), mc.Unsubscribe("det", ART), mc.ForgetDownload("det"),
        mc.MarkFailed("det", "m-2", 2),
        mc.Report("det", M, "failed", reason="download timed out", running_sha=True),
        mc.CleanDownloads("det", frozenset())]


def test_asks_without_a_chunk_back_off_to_8x_and_a_chunk_resets_them() -> None:
    sm = mc.UpdateMachine(replace(CFG, download_timeout_s=1000))
    to_downloading(sm, now=0.0)  # asks after 3, 6, 12, 24, 24 ... s without a chunk
    asks = [t for t in range(0, 100) if sm.handle(mc.Tick(float(t)))]
    assert asks == [4, 11, 24, 49, 74, 99]
    sm.handle(mc.ChunkAccepted("det", "m-2", 100.0))
    assert sm.handle(mc.Tick(103.5)) == [mc.RequestChunks("det", ART)]


def test_a_download_without_chunks_for_long_subscribes_again_once_per_stall() -> None:
    """A broker holding the chunks retained re-sends them on a new SUBSCRIBE: the device asks
    the broker again before the server has to publish anything twice."""
    sm = mc.UpdateMachine(replace(CFG, download_timeout_s=1000, resubscribe_after_s=60))
    to_downloading(sm, now=0.0)
    sm.handle(mc.ChunkAccepted("det", "m-2", 5.0))
    got = {t: sm.handle(mc.Tick(float(t))) for t in range(6, 200)}
    resubscribed = [t for t, effects in got.items() if mc.Subscribe("det", ART) in effects]
    assert resubscribed == [79, 154]  # asks at 9, 16, 29, 54, 79, 104, 129, 154, 179
    assert all(effects[-1] == mc.RequestChunks("det", ART) for effects in got.values() if effects)


def test_connecting_again_asks_for_the_missing_chunks() -> None:
    sm = mc.UpdateMachine(CFG)
    to_downloading(sm)
    assert sm.handle(mc.Connected(1.0)) == [mc.RequestChunks("det", ART)]


def test_a_delta_for_another_base_is_rejected_and_an_earlier_refusal_is_final() -> None:
    sm = mc.UpdateMachine(CFG)
    m = manifest(kind="delta")
    to_checking(sm, m, mc.Device(mc.Running("9" * 64, "m-1")))
    out = quiet(sm.handle(inspected(m)))
    assert out[0] == mc.MarkFailed("det", "m-2", 2)
    assert out[1].state == "rejected" and out[1].reason.startswith("base mismatch")
    to_checking(sm)
    assert quiet(sm.handle(inspected(refusal="bad header")))[1] == mc.Report(
        "det", M, "failed", reason="artifact refused earlier, not decoded again: bad header",
        running_sha=True)


def test_a_failed_apply_drops_the_download_and_the_journal() -> None:
    sm = mc.UpdateMachine(CFG)
    to_downloading(sm)
    sm.handle(mc.DownloadComplete("det", "m-2", 200, 0))
    assert quiet(sm.handle(mc.ApplyFailed("det", "m-2", "target hash mismatch"))) == [
        mc.DropDownload("det", ART), mc.JournalClear("det"), mc.MarkFailed("det", "m-2", 2),
        mc.Report("det", M, "failed", reason="target hash mismatch", running_sha=True),
        mc.CleanDownloads("det", frozenset())]


def test_a_failed_verdict_rolls_back() -> None:
    sm = mc.UpdateMachine(CFG)
    to_trial(sm)
    v = Verdict(False, "error rate 40%", {"errors": 8})
    assert quiet(sm.handle(mc.TrialVerdict("det", "m-2", v))) == [
        mc.JournalStep("det", "rolling_back",
                       {"verdict": {"reason": "error rate 40%", "figures": {"errors": 8}}},
                       soft=True),
        mc.CrashPoint("det", "rollback"), mc.RollBack("det", M, v)]
    assert sm.handle(mc.RolledBack("det", "m-2", True, OLD)) == [
        mc.Report("det", M, "rolled_back", reason="error rate 40%", sha256=OLD,
                  health={"errors": 8}), mc.JournalClear("det")]


def test_a_rollback_done_in_memory_only_keeps_the_journal() -> None:
    sm = mc.UpdateMachine(CFG)
    to_trial(sm)
    sm.handle(mc.TrialVerdict("det", "m-2", Verdict(False, "slow", {})))
    out = sm.handle(mc.RolledBack("det", "m-2", False, OLD))
    assert not any(isinstance(e, mc.JournalClear) for e in out)


def test_an_undecided_verdict_changes_nothing() -> None:
    sm = mc.UpdateMachine(CFG)
    to_trial(sm)
    assert sm.handle(mc.TrialVerdict("det", "m-2", None)) == [] and sm.in_trial("det")


def test_a_zero_window_is_judged_at_once() -> None:
    sm = mc.UpdateMachine(CFG)
    to_trial(sm, manifest(window=0))
    sm.updates["det"].ends_at = None
    assert sm.handle(mc.TrialReady("det", "m-2", 1.0)) == [mc.Judge("det", "m-2", final=True)]


# -- disk space --------------------------------------------------------------------------------
def test_too_little_disk_waits_reports_once_and_retries() -> None:
    sm = mc.UpdateMachine(CFG)
    to_checking(sm)
    out = quiet(sm.handle(inspected(free=10, now=1.0)))
    assert len(out) == 1 and out[0].state == "waiting" and out[0].id_key == "waiting:start"
    assert out[0].running_sha and "not enough disk" in out[0].reason
    assert "m-2" in sm.known_ids("det", RUNNING) and sm.phase("det") is P.IDLE
    assert sm.handle(mc.Tick(30.0)) == []
    token = sm.waiting["det"].token
    assert sm.handle(mc.Tick(31.0)) == [mc.Reconsider("det", RAW, "waiting", token)]
    to_checking(sm)  # the retry: still too little space, said once only
    assert quiet(sm.handle(inspected(free=10, now=31.0))) == []
    assert sm.waiting["det"].token != token


def test_a_held_manifest_refused_on_retry_is_given_up() -> None:
    sm = mc.UpdateMachine(CFG)
    to_checking(sm)
    sm.handle(inspected(free=10))
    token = sm.waiting["det"].token
    assert quiet(sm.handle(mc.Reconsidered("det", "waiting", token))) == [
        mc.JournalClear("det", only_manifest_id="m-2"), mc.CleanDownloads("det", frozenset())]
    assert sm.waiting == {}


def test_a_full_disk_mid_download_pauses_it_and_keeps_its_chunks() -> None:
    sm = mc.UpdateMachine(CFG)
    to_downloading(sm)
    out = quiet(sm.handle(mc.OutOfSpace("det", "disk full", "download", 5.0)))
    assert out == [mc.Unsubscribe("det", ART), mc.ForgetDownload("det"),
                   mc.Report("det", M, "waiting", reason="disk full", running_sha=True,
                             id_key="waiting:download")]
    assert sm.handle(mc.Tick(35.0))[0].why == "waiting"
    assert quiet(sm._clean("det")) == [mc.CleanDownloads("det", frozenset({ART}))]


def test_a_serial_that_cannot_be_recorded_holds_the_manifest() -> None:
    sm = mc.UpdateMachine(CFG)
    sm.handle(mc.ManifestVerified("det", M, RAW, RUNNING))
    out = quiet(sm.handle(mc.OutOfSpace("det", "No space left on device", "start", 0.0)))
    assert out[0].state == "waiting" and "manifest serial" in out[0].reason


# -- trust -------------------------------------------------------------------------------------
def test_a_manifest_held_for_its_signature_is_checked_again_after_a_trust_update() -> None:
    sm = mc.UpdateMachine(CFG)
    sm.handle(mc.ManifestRejected("det", RAW, "unknown key", "m-2", RUNNING, hold=True))
    assert sm.handle(mc.TrustUpdated()) == [mc.Reconsider("det", RAW, "trust", "")]
    assert sm.handle(mc.TrustUpdated()) == []


# -- restart from every journal step -------------------------------------------------------------
VERDICT = {"reason": "p95", "figures": {"p95_us": 9}}
RECOVERY = [
    # step, extra record fields, current sha, effects at Restarted, effects at Resumed
    ("downloading", {}, OLD, [], [mc.JournalClear("det"), mc.Reconsider("det", RAW, "redo",
                                                                        "m-2")]),
    ("patching", {}, OLD, [], [mc.JournalClear("det"), mc.Reconsider("det", RAW, "redo", "m-2")]),
    ("staged", {}, OLD, [], [mc.JournalClear("det"), mc.Reconsider("det", RAW, "redo", "m-2")]),
    ("activating", {}, OLD, [], [mc.JournalClear("det"),
                                 mc.Reconsider("det", RAW, "redo", "m-2")]),
    ("activating", {}, NEW, [], [mc.JournalStep("det", "trial", trial_window_s=10.0),
                                 mc.Report("det", M, "trial", sha256=NEW),
                                 mc.StartTrial("det", M, 10.0, resumed=True),
                                 mc.CleanDownloads("", frozenset())]),
    ("trial", {"trial": {"ends_at": 4.0, "restarts": 0}}, NEW,
     [mc.JournalStep("det", "trial", {"trial": {"ends_at": 4.0, "restarts": 1}},
                     space_step="recovery")],
     [mc.StartTrial("det", M, 4.0, resumed=True), mc.CleanDownloads("", frozenset())]),
    ("trial", {"trial": {"ends_at": 4.0, "restarts": 1}}, NEW,
     [mc.JournalStep("det", "rolling_back", {"verdict": {
         "reason": "agent restarted 2 times during the trial", "figures": {}}}, soft=True),
      mc.RollStateBack("det", "m-2")],
     [mc.RollBack("det", M, Verdict(False, "agent restarted 2 times during the trial", {})),
      mc.CleanDownloads("", frozenset())]),
    ("trial", {"trial": {"ends_at": 4.0, "restarts": 0}}, OLD, [],
     [mc.JournalClear("det"), mc.CleanDownloads("", frozenset())]),
    ("committing", {"verdict": VERDICT}, NEW, [],
     [mc.Report("det", M, "healthy", sha256=NEW, health={"p95_us": 9}), mc.JournalClear("det"),
      mc.CleanDownloads("", frozenset())]),
    ("rolling_back", {"verdict": VERDICT}, NEW, [mc.RollStateBack("det", "m-2")],
     [mc.RollBack("det", M, Verdict(False, "p95", {"p95_us": 9})),
      mc.CleanDownloads("", frozenset())]),
    ("rolling_back", {"verdict": VERDICT}, OLD, [],
     [mc.RollBack("det", M, Verdict(False, "p95", {"p95_us": 9})),
      mc.CleanDownloads("", frozenset())]),
]


@pytest.mark.parametrize(("step", "extra", "current", "at_start", "resumed"), RECOVERY,
                         ids=[f"{r[0]}-{'new' if r[2] == NEW else 'old'}-{i}"
                              for i, r in enumerate(RECOVERY)])
def test_restart_from_every_journal_step(step: str, extra: dict, current: str, at_start: list,
                                         resumed: list) -> None:
    sm = mc.UpdateMachine(CFG)
    entry = mc.JournalEntry("det", record(JOURNAL, step, **extra), M, current, True)
    assert quiet(sm.handle(mc.Restarted((entry,)))) == at_start
    assert sm.recovering == {"m-2"}  # known while recovering: a redo is no replay
    assert quiet(sm.handle(mc.Resumed(wall_now=0.0))) == resumed


def test_a_redo_cleans_leftover_chunks_only_after_the_recovery() -> None:
    sm = mc.UpdateMachine(CFG)
    sm.handle(mc.Restarted((mc.JournalEntry("det", record(JOURNAL, "staged"), M, OLD, True),)))
    sm.handle(mc.Resumed(0.0))
    assert sm._clean("det") == []
    assert sm.handle(mc.Reconsidered("det", "redo", "m-2")) == [
        mc.CleanDownloads("det", frozenset())]


def test_a_trial_restart_that_cannot_be_counted_rolls_back() -> None:
    sm = mc.UpdateMachine(CFG)
    rec = record(JOURNAL, "trial", trial={"ends_at": 4.0, "restarts": 0})
    sm.handle(mc.Restarted((mc.JournalEntry("det", rec, M, NEW, True),)))
    out = quiet(sm.handle(mc.OutOfSpace("det", "disk full", "recovery")))
    reason = "disk full: the restart during the trial cannot be counted"
    assert out == [mc.JournalStep("det", "rolling_back",
                                  {"verdict": {"reason": reason, "figures": {}}}, soft=True),
                   mc.RollStateBack("det", "m-2")]
    assert quiet(sm.handle(mc.Resumed(0.0)))[0] == mc.RollBack("det", M, Verdict(False, reason,
                                                                                   {}))


def test_a_journal_record_that_does_not_verify_is_dropped() -> None:
    sm = mc.UpdateMachine(CFG)
    entry = mc.JournalEntry("det", record(JOURNAL, "trial"), None, NEW, True, "bad signature")
    assert quiet(sm.handle(mc.Restarted((entry,)))) == [mc.JournalClear("det")]
    assert sm.recovering == set()


def test_the_machine_imports_no_io() -> None:
    code = ("import sys, deltafleet.agent.machine; print(sorted(m for m in sys.modules if "
            "m.split('.')[0] in {'paho', 'sqlalchemy', 'subprocess', 'socket', 'onnxruntime'} "
            "or m in {'deltafleet.agent.store', 'deltafleet.agent.journal', "
            "'deltafleet.agent.codecs', 'deltafleet.agent.daemon'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
