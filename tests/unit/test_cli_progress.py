"""The pure parts of fleetctl's progress (lines, views, steps, the change detection) and the
agent's trusted-key check, without a terminal, a broker or a database."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from deltafleet.agent.errors import ConfigError
from deltafleet.agent.trust import load_trusted_key
from deltafleet.server.cli import progress
from deltafleet.shared import SigningKey
from scripts.demo import DemoFailed, last_problem, step
from tests.harness.fleetlab import wait_for


def rollout(state: str = "running", wave: int = 0, counts: dict[str, int] | None = None,
            sent: int = 0, **extra: Any) -> dict[str, Any]:
    return {"id": 4, "model": "detector", "version": "v2", "group": "jetson", "state": state,
            "state_reason": None, "current_wave": wave, "counts": counts or {"pending": 3},
            "bytes_sent": sent, "full_bytes": 3 << 20,
            "policy": {"canary": "1", "waves": [50.0, 100.0]}, **extra}


def test_the_line_names_state_wave_devices_by_state_and_bytes() -> None:
    data = rollout(counts={"failed": 1, "downloading": 3, "healthy": 12}, sent=4404019)
    assert progress.rollout_line(data) == (
        "rollout 4 running wave 1/3: 12 healthy 3 downloading 1 failed, 4.2 MiB sent")


def test_a_paused_rollout_line_says_why() -> None:
    data = rollout("paused", 1, {"failed": 2}, state_reason="failures 2 over 5%")
    assert progress.rollout_line(data).endswith("0 B sent (failures 2 over 5%)")


def test_states_are_counted_done_first_then_in_progress_then_trouble() -> None:
    counts = {"cancelled": 1, "pending": 2, "rolled_back": 1, "trial": 1, "healthy": 3,
              "weird": 1, "held": 0}
    assert progress.states_text(counts) == (
        "3 healthy 1 trial 2 pending 1 rolled_back 1 cancelled 1 weird")
    assert progress.states_text({}) == "no devices"


def test_the_wave_count_comes_from_the_policy_or_the_devices() -> None:
    assert progress.wave_total(rollout()) == 3
    assert progress.wave_total(rollout(policy={}, targets=[{"wave": 4}])) == 5
    assert progress.wave_total(rollout(policy={"bogus": 1}, wave=1)) == 2


def test_the_live_view_has_a_row_per_wave_and_the_devices_in_trouble() -> None:
    targets = [{"device": "a", "wave": 0, "state": "healthy", "reason": None},
               {"device": "b", "wave": 1, "state": "failed", "reason": "apply failed"},
               {"device": "c", "wave": 1, "state": "downloading", "reason": None}]
    view = progress.rollout_view(rollout(wave=1, counts={"healthy": 1, "failed": 1,
                                                         "downloading": 1}, targets=targets),
                                 elapsed_s=75)
    assert view[0] == "rollout 4: detector v2 -> group jetson  running  wave 2/3  (01:15)"
    assert view[1].startswith("wave 1   [####################] 1/1  1 healthy")
    assert view[2].endswith("0/2  1 downloading 1 failed")
    assert view[3].endswith("0/0  no devices")
    assert view[-1] == "  b failed: apply failed"


def test_follow_piped_prints_one_stamped_line_per_change_and_stops_at_the_end() -> None:
    states = iter([rollout(), rollout(), rollout(counts={"downloading": 3}),
                   rollout(counts={"downloading": 3}),
                   rollout("completed", 2, {"healthy": 3}, 1024)])
    out = io.StringIO()
    followed = progress.follow(lambda: next(states), until=lambda d: d["state"] == "completed",
                               interval_s=0, stream=out)
    lines = out.getvalue().splitlines()
    assert [x[9:] for x in lines] == [
        "rollout 4 running wave 1/3: 3 pending, 0 B sent",
        "rollout 4 running wave 1/3: 3 downloading, 0 B sent",
        "rollout 4 completed wave 3/3: 3 healthy, 1.0 KiB sent"]
    assert all(re.match(r"\d\d:\d\d:\d\d $", x[:9]) for x in lines)
    assert followed.data["state"] == "completed" and not followed.timed_out


def test_follow_gives_up_at_the_timeout_and_says_it_timed_out() -> None:
    out = io.StringIO()
    followed = progress.follow(rollout, until=lambda d: False, timeout_s=0.05, interval_s=0.01,
                               stream=out)
    assert followed.timed_out and len(out.getvalue().splitlines()) == 1


def test_the_stamp_is_utc() -> None:
    assert progress.clock(datetime(2026, 1, 2, 5, 12, 3, tzinfo=UTC)) == "05:12:03"


def test_steps_piped_print_finished_steps_with_their_time_and_skip_silent_ones() -> None:
    out = io.StringIO()
    with progress.Steps("model add m:v1", stream=out, tty=False) as steps:
        steps.start("inspecting", silent=True)
        steps.done("inspected 2.0 MiB")
        steps.start("storing", 100)
        steps.advance(100)
        steps.start("compressing", silent=True)  # ends "storing", which is not silent
        steps.done()  # silent: no line
        steps.note("done")
    said = [x[9:] for x in out.getvalue().splitlines()]
    assert [re.sub(r" \(\d+\.\d s\)$", "", x) for x in said] == [
        "model add m:v1: inspected 2.0 MiB", "model add m:v1: storing", "model add m:v1: done"]


def test_a_long_step_piped_says_it_is_still_running() -> None:
    out = io.StringIO()
    with progress.Steps("delta a -> b", stream=out, tty=False, heartbeat_s=0.2) as steps:
        steps.start("encoding bsdiff4")
        wait_for(lambda: out.getvalue().count("still encoding") >= 2, 30, "two heartbeat lines",
                 interval_s=0.02)
        steps.done("bsdiff4 1.0 KiB")
    said = [x[9:] for x in out.getvalue().splitlines()]
    assert re.fullmatch(r"delta a -> b: still encoding bsdiff4, \d\.\d+ s", said[0]), said
    assert said[-1].startswith("delta a -> b: bsdiff4 1.0 KiB (")
    assert len(said) >= 2 and len(set(said[:-1])) == len(said) - 1  # each beat once


def test_disabled_steps_print_nothing() -> None:
    out = io.StringIO()
    with progress.Steps("x", stream=out, tty=False, enabled=False) as steps:
        steps.start("a")
        steps.done()
        steps.note("done")
    assert out.getvalue() == ""


# -- the agent's trusted key ---------------------------------------------------------------

def test_a_good_trusted_key_loads(tmp_path: Path) -> None:
    key = SigningKey.generate()
    key.save(tmp_path / "signing.key", tmp_path / "signing.pub")
    assert load_trusted_key(tmp_path / "signing.pub") is not None


@pytest.mark.parametrize(("content", "says"), [
    (None, "no such file"), ("dir", "is a directory"), (b"", "is empty"),
    (b"\x00\x01garbage" * 10, "is not a PEM public key"),
    (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
     "is not a valid PEM public key"),
    (b"x" * (65 << 10), "is larger than 64 KiB"),
])
def test_a_wrong_trusted_key_is_one_line_naming_the_file(tmp_path: Path, content: Any,
                                                         says: str) -> None:
    path = tmp_path / "key.pub"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_trusted_key(path)
    assert str(e.value).startswith(f"trusted key {path}: {says}; expected ")
    assert "\n" not in str(e.value)


def test_a_private_key_is_refused_as_such(tmp_path: Path) -> None:
    SigningKey.generate().save(tmp_path / "signing.key", tmp_path / "signing.pub")
    with pytest.raises(ConfigError, match="is a private key"):
        load_trusted_key(tmp_path / "signing.key")


# -- the demo's failure line ---------------------------------------------------------------

def test_a_failed_demo_step_is_one_line_with_the_step_and_the_cause() -> None:
    with pytest.raises(DemoFailed) as e, step("roll v2 out to group jetson"):
        raise RuntimeError("rollout 2 of v2 to jetson ended paused:\n  jetson-1 failed")
    assert str(e.value) == ('demo failed at step "roll v2 out to group jetson": rollout 2 of '
                            "v2 to jetson ended paused: jetson-1 failed")


def test_the_last_problem_of_a_log_is_its_last_error_or_warning() -> None:
    log = ("2026-01-01 00:00:00,001 INFO x: started\n"
           "2026-01-01 00:00:01,002 WARNING deltafleet.shared.mqtt: broker refused\n"
           "2026-01-01 00:00:02,003 INFO x: still here\n")
    assert last_problem(log) == "WARNING deltafleet.shared.mqtt: broker refused"
    assert last_problem("error: trusted key k: is empty\n") == "error: trusted key k: is empty"
    assert last_problem("just a line\n") == "just a line"
    assert last_problem("") is None
