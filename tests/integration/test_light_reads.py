"""The operator's reads (``reads``): the same statements through the standard library's sqlite3
(fleetctl on the SQLite default, no SQLAlchemy import) and through a SQLAlchemy session (the
server, the API, PostgreSQL) give the same JSON, and that JSON agrees with the ORM's rows;
the light path imports no SQLAlchemy; bad input and a bad store file get one line."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from deltafleet.server import reads, views
from deltafleet.server.errors import StoreError
from deltafleet.server.store.models import Device, RolloutTarget, recount
from deltafleet.server.store.models import Rollout as RolloutRow
from tests.harness.cli import assert_one_line_error, fleetctl

FAST = {"health_window_s": 1, "retry_backoff_s": 1, "state_timeout_s": 60}


@pytest.fixture
def models(onnx_pair) -> dict[str, Path]:
    return onnx_pair(0.3)


def _everything(q: reads.Reader) -> dict[str, object]:
    """Every read fleetctl makes, as JSON-able values."""
    devices = reads.devices(q)
    desired = reads.desired_for(q, devices)
    listed = reads.rollouts_json(q)
    return {
        "devices": [views.device_to_json(d, desired[d.id]) for d in devices],
        "jetson": [d.id for d in reads.devices(q, "jetson")],
        "desired": {k: [dataclasses.asdict(x) for x in v] for k, v in desired.items()},
        "rollouts": listed,
        "status": [reads.rollout_json(q, r["id"]) for r in listed],
    }


@pytest.mark.broker
def test_lite_and_session_reads_agree_with_each_other_and_with_the_orm(rollout_lab, models,
                                                                        lab_db_url):
    lab = rollout_lab(models, db_url=lab_db_url)
    ids = lab.add_devices(8, {"hw": "jetson"})
    lab.add_devices(2, {"hw": "pi"}, prefix="pi")
    lab.group("jetson", hw="jetson")
    lab.fleet.devices[ids[0]].knobs.fail_health = True
    lab.fleet.devices[ids[1]].knobs.fail_apply = True
    first = lab.rollout("v2", "jetson", canary="3", waves=(100.0,), max_failure_pct=90.0,
                        max_attempts=1, **FAST)
    lab.wait_state(first, {"completed"}, 120)
    assert lab.act(first, "rollback")
    lab.wait_state(first, {"rolled_back"}, 120)
    second = lab.rollout("v2", "jetson", canary="3", waves=(50.0, 100.0), max_failure_pct=90.0,
                         max_attempts=1, **FAST)
    lab.wait_for(lambda: lab.status(second)["counts"].get("healthy", 0) >= 3, 60, "a wave")
    lab.stop_server()  # one still picture to read twice

    with lab.store.read() as s:
        through_session = _everything(reads.SessionReader(s))
        rows = {(t.rollout_id, t.device_id): t.state for t in s.scalars(select(RolloutTarget))}
        rollout_ids = set(s.scalars(select(RolloutRow.id)))
        device_ids = set(s.scalars(select(Device.id)))
        recounts = {rid: recount(s, rid) for rid in rollout_ids}
    if lab_db_url is None:
        path = reads.sqlite_path(lab.cfg.db_url)
        assert path is not None
        with reads.SqliteReader(path) as q:
            assert _everything(q) == through_session

    # the JSON says what the ORM's rows say
    assert {d["id"] for d in through_session["devices"]} == device_ids
    assert set(through_session["jetson"]) == set(ids)
    shown = {(r["id"], t["device"]): t["state"]
             for r in through_session["status"] for t in r["targets"]}
    assert shown == rows
    for r in through_session["status"]:
        by_state: dict[str, int] = {}
        for (_, state), n in recounts[r["id"]].items():
            by_state[state] = by_state.get(state, 0) + n
        assert r["counts"] == by_state
    assert {r["id"] for r in through_session["rollouts"]} == rollout_ids
    states = {r["id"]: r["state"] for r in through_session["rollouts"]}
    assert states[first] == "rolled_back" and states[second] in ("running", "completed")


def _fleetctl_subprocess(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """fleetctl in a fresh interpreter; prints whether SQLAlchemy was imported."""
    code = ("import sys\nfrom deltafleet.server.cli import main\n"
            f"sys.argv = ['fleetctl', *{list(args)!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
            "print('SQLALCHEMY', 'sqlalchemy' in sys.modules, file=sys.stderr)\n"
            "sys.exit(code)\n")
    env = {**os.environ, "FLEET_HOME": str(home)}
    env.pop("FLEET_DB_URL", None)
    env.pop("FLEET_API_URL", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_fleetctl_reads_on_the_sqlite_default_import_no_sqlalchemy(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("FLEET_HOME", str(home))
    monkeypatch.delenv("FLEET_DB_URL", raising=False)
    assert fleetctl("init").exit_code == 0
    for args in (("device", "list"), ("device", "list", "--json"), ("rollout", "list"),
                 ("rollout", "list", "--json"), ("rollout", "status", "1")):
        done = _fleetctl_subprocess(home, *args)
        assert "SQLALCHEMY False" in done.stderr, (args, done.stderr)
    # a store that is not at head is still checked by alembic, which says what is wrong
    (home / "fleet.db").write_bytes(b"not a database" * 100)
    done = _fleetctl_subprocess(home, "device", "list")
    assert done.returncode != 0
    err = [x for x in done.stderr.splitlines() if not x.startswith("SQLALCHEMY")]
    assert len(err) == 1 and err[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("group", ["\ud800", "a\x00b", "g" * 5000, "'; DROP TABLE devices; --"])
def test_hostile_group_names_get_one_line_and_change_nothing(tmp_path, monkeypatch, group):
    home = tmp_path / "home"
    monkeypatch.setenv("FLEET_HOME", str(home))
    monkeypatch.delenv("FLEET_DB_URL", raising=False)
    assert fleetctl("init").exit_code == 0
    before = (home / "fleet.db").read_bytes()
    for args in (("device", "list", "--group", group),
                 ("device", "list", "--group", group, "--json")):
        result = fleetctl(*args)
        assert_one_line_error(result, exit_code=result.exit_code or -1)
        assert result.exit_code in (1, 2)
    assert (home / "fleet.db").read_bytes() == before
    assert fleetctl("device", "list").exit_code == 0


def test_the_lite_reader_cannot_write(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("FLEET_HOME", str(home))
    monkeypatch.delenv("FLEET_DB_URL", raising=False)
    assert fleetctl("init").exit_code == 0
    with reads.SqliteReader(home / "fleet.db") as q, pytest.raises(StoreError) as info:
        q.rows("DELETE FROM devices")
    assert "readonly" in str(info.value) or "read-only" in str(info.value)


@pytest.mark.parametrize("bad", ["\ud800", "a\x00b", "\udcff.onnx"])
@pytest.mark.parametrize("command", [("device", "show"), ("group", "show"), ("model", "show"),
                                     ("rollout", "list", "--state"), ("model", "inspect")])
def test_an_argument_no_store_can_hold_is_one_line_before_anything_runs(tmp_path, monkeypatch,
                                                                         command, bad):
    """Bytes that are not UTF-8 (Python's lone surrogates) or a NUL in any argument: exit 2
    with one line, never a driver's traceback."""
    monkeypatch.setenv("FLEET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLEET_DB_URL", raising=False)
    assert fleetctl("init").exit_code == 0
    assert_one_line_error(fleetctl(*command, bad), exit_code=2)
