"""Event-driven reconciliation against SQL: the per-(wave, state) counters the flush hook keeps
equal a recount after a SimFleet rollout with failures, holds, abort and rollback (SQLite and
PostgreSQL); a tick with nothing due touches O(1) rows; a read completes while a long write
transaction is open (SQLite WAL)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.engine import CursorResult

from deltafleet.server import fleet
from deltafleet.server.daemon import FleetServer
from deltafleet.server.rollouts import get_rollout, rollout_json
from deltafleet.server.store import Store, upgrade
from deltafleet.server.store.models import Rollout, RolloutTarget, counts, recount, utcnow
from deltafleet.shared import Hello

FAST = {"health_window_s": 1, "retry_backoff_s": 1, "state_timeout_s": 60}


@pytest.fixture
def models(onnx_pair) -> dict[str, Path]:
    return onnx_pair(0.3)


def assert_counts_equal_recount(store: Store) -> None:
    with store.read() as s:
        for rid in s.scalars(select(Rollout.id)).all():
            assert counts(s, rid) == recount(s, rid), f"rollout {rid}"


@pytest.mark.broker
def test_counters_equal_a_recount_after_failures_holds_abort_and_rollback(rollout_lab, models,
                                                                          lab_db_url):
    lab = rollout_lab(models, db_url=lab_db_url)
    ids = lab.add_devices(12, {"hw": "jetson"})
    lab.group("jetson", hw="jetson")
    for device_id in ids[:2]:
        lab.fleet.devices[device_id].knobs.fail_health = True
    lab.fleet.devices[ids[2]].knobs.fail_apply = True
    first = lab.rollout("v2", "jetson", canary="4", waves=(100.0,), max_failure_pct=90.0,
                        max_attempts=2, **FAST)
    lab.wait_for(lambda: any(t["state"] == "held" for t in lab.status(first)["targets"]),
                 60, "a held device")
    assert_counts_equal_recount(lab.store)
    assert lab.act(first, "abort")
    lab.wait_state(first, {"aborted"})
    assert_counts_equal_recount(lab.store)
    second = lab.rollout("v2", "jetson", canary="4", waves=(100.0,), max_failure_pct=90.0,
                         max_attempts=1, **FAST)
    lab.wait_state(second, {"completed"}, 120)
    assert_counts_equal_recount(lab.store)
    assert lab.act(second, "rollback")
    data = lab.wait_state(second, {"rolled_back"}, 120)
    assert {t["state"] for t in data["targets"]} <= {"reverted", "failed", "cancelled"}
    assert_counts_equal_recount(lab.store)
    with lab.store.read() as s:  # the counters are what `rollout status` would count
        by_state: dict[str, int] = {}
        for (_, state), n in counts(s, second).items():
            by_state[state] = by_state.get(state, 0) + n
        assert by_state == rollout_json(s, get_rollout(s, second))["counts"]


def test_a_tick_with_nothing_due_touches_o1_rows(rollout_lab, models):
    """500 targets in flight, none due: a tick runs a fixed handful of statements and fetches
    a fixed handful of rows, whatever the fleet's size."""
    lab = rollout_lab(models, start=False)
    hellos = [Hello(f"d{i:04d}", "1.0", {"runtimes": {"onnxruntime": "1.20"}}, {"hw": "x"}, ())
              for i in range(500)]
    with lab.store.session() as s:
        fleet.upsert_devices_from_hellos(s, hellos, utcnow())
    lab.group("x", hw="x")
    rid = lab.rollout("v2", "x", **FAST)
    ctl = FleetServer(lab.cfg, lab.store).controller
    with lab.store.session() as s:  # the first tick dispatches all 500 (and sweeps devices)
        publishes, _ = ctl.reconcile(s, utcnow())
    assert len(publishes) == 500
    statements: list[str] = []
    fetched: list[int] = []
    original = CursorResult.fetchall

    def on_execute(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    def counting_fetchall(self):  # type: ignore[no-untyped-def]
        rows = original(self)
        fetched.append(len(rows))
        return rows

    event.listen(lab.store.engine, "after_cursor_execute", on_execute)
    CursorResult.fetchall = counting_fetchall  # type: ignore[method-assign]
    try:
        for i in range(1, 6):
            with lab.store.session() as s:
                publishes, servable = ctl.reconcile(s, utcnow() + timedelta(seconds=i))
            assert publishes == [] and len(servable) == 1
    finally:
        CursorResult.fetchall = original  # type: ignore[method-assign]
        event.remove(lab.store.engine, "after_cursor_execute", on_execute)
    assert len(statements) / 5 <= 15, statements[:20]
    assert sum(fetched) / 5 <= 20, fetched
    assert_counts_equal_recount(lab.store)
    with lab.store.read() as s:
        assert counts(s, rid) == {(0, "notified"): 500}


def test_a_read_completes_while_a_long_write_transaction_is_open(tmp_path):
    url = f"sqlite:///{tmp_path}/fleet.db"
    upgrade(url)
    store = Store(url)
    opened, release = threading.Event(), threading.Event()

    def writer() -> None:
        with store.session() as s:
            s.execute(text("UPDATE rollouts SET state_reason = 'x'"))  # holds the write lock
            opened.set()
            release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert opened.wait(5)
        started = time.monotonic()
        with store.read() as s:
            assert fleet.list_devices(s) == []
            assert s.scalars(select(RolloutTarget)).all() == []
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
        t.join(10)
        store.dispose()
