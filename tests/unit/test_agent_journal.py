"""The update journal: legal transitions only, and what a restart does at each step."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltafleet.agent.journal import Journal, raw_manifest, reconcile

NEW, OLD = "b" * 64, "a" * 64


def rec(step: str, **extra) -> dict:
    return {"step": step, "target_sha256": NEW, "previous_sha256": OLD, **extra}


def test_records_survive_reopening_and_only_move_forward(tmp_path: Path):
    j = Journal(tmp_path)
    j.begin("m", "downloading", b"signed", "mid", NEW, OLD)
    j.advance("m", "patching")
    again = Journal(tmp_path)
    assert again.get("m")["step"] == "patching"
    assert raw_manifest(again.get("m")) == b"signed"
    with pytest.raises(ValueError, match="illegal"):
        again.advance("m", "committing")
    again.clear("m")
    assert again.all() == {}


@pytest.mark.parametrize("step", ["downloading", "patching", "staged"])
def test_crash_before_activation_redoes_from_verified_bytes(step):
    assert reconcile(rec(step), OLD, False, max_trial_restarts=1).action == "redo"


def test_crash_during_activation_depends_on_what_state_json_says():
    assert reconcile(rec("activating"), NEW, True, max_trial_restarts=1).action == "resume_trial"
    assert reconcile(rec("activating"), OLD, True, max_trial_restarts=1).action == "redo"


def test_repeated_crashes_during_a_trial_roll_back():
    once = rec("trial", trial={"restarts": 0})
    twice = rec("trial", trial={"restarts": 1})
    assert reconcile(once, NEW, True, max_trial_restarts=1).action == "resume_trial"
    assert reconcile(twice, NEW, True, max_trial_restarts=1).action == "finish_rollback"


def test_commit_and_rollback_are_finished_after_a_crash():
    assert reconcile(rec("committing"), NEW, True, max_trial_restarts=1).action == "finish_commit"
    r = reconcile(rec("rolling_back", verdict={"reason": "p95"}), NEW, True, max_trial_restarts=1)
    assert (r.action, r.reason) == ("finish_rollback", "p95")
