"""The update machine on a withdrawal (an empty manifest on the model's desired topic) and the
bytes a failed download reports: pure, no broker, no disk."""

from __future__ import annotations

from deltafleet.agent import machine as mc
from deltafleet.agent.machine import P
from deltafleet.agent.trial import Verdict
from tests.unit.test_update_machine import (
    ART,
    CFG,
    RUNNING,
    M,
    inspected,
    manifest,
    quiet,
    to_checking,
    to_downloading,
    to_trial,
)


def test_the_withdrawal_is_a_row_of_the_documented_table() -> None:
    rows = [line.split()[:3] for line in (mc.__doc__ or "").splitlines()]
    assert ["downloading", "idle", "Withdrawn"] in rows and ["checking", "idle", "Withdrawn"] in rows
    assert (P.DOWNLOADING, P.IDLE) in mc.TRANSITIONS and (P.CHECKING, P.IDLE) in mc.TRANSITIONS


def test_a_withdrawn_download_is_dropped_and_the_running_model_stays() -> None:
    sm = mc.UpdateMachine(CFG)
    to_downloading(sm)
    out = quiet(sm.handle(mc.Withdrawn("det")))
    assert out == [mc.Unsubscribe("det", ART), mc.ForgetDownload("det"),
                   mc.DropDownload("det", ART), mc.JournalClear("det"),
                   mc.CleanDownloads("det", frozenset())]
    assert sm.phase("det") is P.IDLE and sm.downloading() == {}
    assert not any(isinstance(e, mc.Report | mc.MarkFailed | mc.SwapIn | mc.Apply) for e in out)
    # chunks arriving late are for nothing; a tick asks for nothing
    assert sm.handle(mc.ChunkAccepted("det", "m-2", 1.0, 100)) == []
    assert sm.handle(mc.Tick(200.0)) == []


def test_a_withdrawal_while_checking_goes_idle() -> None:
    sm = mc.UpdateMachine(CFG)
    to_checking(sm)
    assert sm.phase("det") is P.CHECKING
    out = quiet(sm.handle(mc.Withdrawn("det")))
    assert out == [mc.DropDownload("det", ART), mc.JournalClear("det"),
                   mc.CleanDownloads("det", frozenset())]
    assert sm.phase("det") is P.IDLE
    assert sm.handle(inspected()) == []  # the inspection's outcome is stale


def test_applying_and_trial_are_not_stopped_but_a_pending_manifest_is_dropped() -> None:
    sm = mc.UpdateMachine(CFG)
    to_trial(sm)
    newer = manifest("m-3", serial=3)
    to_checking(sm, newer)
    assert "det" in sm.pending
    assert quiet(sm.handle(mc.Withdrawn("det"))) == []  # only logs
    assert sm.phase("det") is P.TRIAL and sm.pending == {}
    out = sm.handle(mc.TrialVerdict("det", "m-2", Verdict(True, "ok", {})))
    assert not any(isinstance(e, mc.Reconsider) for e in out)  # nothing left to do after it
    assert any(isinstance(e, mc.Report) and e.state == "healthy" for e in out)

    sm = mc.UpdateMachine(CFG)
    to_checking(sm)
    sm.handle(inspected(on_disk=True))  # applying: the swap goes on
    assert quiet(sm.handle(mc.Withdrawn("det"))) == []
    assert sm.phase("det") is P.APPLYING


def test_a_manifest_held_for_space_is_dropped_with_its_chunks_and_record() -> None:
    sm = mc.UpdateMachine(CFG)
    to_downloading(sm)
    sm.handle(mc.OutOfSpace("det", "disk full", "download", 5.0))
    assert "det" in sm.waiting
    out = quiet(sm.handle(mc.Withdrawn("det")))
    assert out == [mc.DropDownload("det", ART), mc.JournalClear("det", only_manifest_id="m-2"),
                   mc.CleanDownloads("det", frozenset())]
    assert sm.waiting == {} and sm.handle(mc.Tick(100.0)) == []


def test_a_withdrawal_with_nothing_in_progress_does_nothing() -> None:
    sm = mc.UpdateMachine(CFG)
    assert sm.handle(mc.Withdrawn("det")) == []
    to_downloading(sm)
    assert sm.handle(mc.Withdrawn("other")) == []
    assert sm.phase("det") is P.DOWNLOADING


def test_a_new_manifest_after_a_withdrawal_is_downloaded_afresh() -> None:
    sm = mc.UpdateMachine(CFG)
    to_downloading(sm)
    sm.handle(mc.Withdrawn("det"))
    newer = manifest("m-3", serial=3)
    assert quiet(to_checking(sm, newer)) == [mc.Inspect("det", newer)]
    assert "m-2" not in sm.known_ids("det", RUNNING)


def test_a_download_that_times_out_reports_the_bytes_it_fetched() -> None:
    sm = mc.UpdateMachine(CFG)
    to_checking(sm)
    sm.handle(inspected())
    sm.handle(mc.DownloadOpened("det", "m-2", 1, 100, False, 0.0))  # one chunk reused
    sm.handle(mc.ChunkAccepted("det", "m-2", 1.0, 60))
    out = sm.handle(mc.Tick(101.0))
    (report,) = [e for e in out if isinstance(e, mc.Report)]
    assert report == mc.Report("det", M, "failed", reason="download timed out",
                               running_sha=True, bytes_received=160, chunks_reused=1)


def test_a_failure_before_any_download_reports_no_bytes() -> None:
    sm = mc.UpdateMachine(CFG)
    to_checking(sm)
    out = sm.handle(inspected(refusal="bad artifact"))
    (report,) = [e for e in out if isinstance(e, mc.Report)]
    assert (report.state, report.bytes_received) == ("failed", 0)
