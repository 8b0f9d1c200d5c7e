"""The live rollout stream (``GET /api/v1/rollouts/{id}/stream``) on a real rollout: a server
(FleetServer with its API listener) and simulated devices on a real Mosquitto. Every target's
state move arrives as a ``device`` event with an id, before the ``status`` it led to; a
client that reconnects with Last-Event-ID gets exactly the events it missed."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from deltafleet.server.api.tokens import create_token
from deltafleet.server.rollouts import create_rollout, rollout_events
from deltafleet.server.store.models import ROLLOUT_EVENTS_KEPT_DAYS, Rollout, RolloutEvent, utcnow
from tests.harness.api_client import ApiClient, ServerEvent
from tests.harness.fleetlab import free_port, wait_port
from tests.harness.rollout_lab import RolloutLab

pytestmark = pytest.mark.broker

DEVICES = 3


@pytest.fixture(scope="module")
def streamed(tmp_path_factory: pytest.TempPathFactory, broker, onnx_pair
             ) -> Iterator[dict[str, Any]]:
    """A rollout of detector:v2 to three devices running v1, read from its stream from the
    moment it was created to its end."""
    root = tmp_path_factory.mktemp("stream")
    lab = RolloutLab(root, broker.url, onnx_pair(0.3))
    port = free_port()
    lab.cfg = dataclasses.replace(lab.cfg, api_listen=f"127.0.0.1:{port}")
    with lab.store.session() as s:
        _, token = create_token(s, "stream-viewer", "viewer", "test")
    try:
        lab.start_server()
        wait_port(port, 15)
        lab.add_devices(DEVICES, {"hw": "cam"})
        lab.group("cams", hw="cam")
        rid = lab.rollout("v2", "cams", health_window_s=1, retry_backoff_s=1)
        api = ApiClient(port, token)
        events = list(api.events(f"/api/v1/rollouts/{rid}/stream"))
        yield {"lab": lab, "api": api, "rid": rid, "events": events}
    finally:
        lab.close()


def moves(events: list[ServerEvent]) -> list[ServerEvent]:
    return [e for e in events if e.event == "device"]


def test_the_stream_ends_with_the_final_status_after_every_device_event(streamed):
    events = streamed["events"]
    assert events[-1].event == "status" and events[-1].data["state"] == "completed"
    assert {t["state"] for t in events[-1].data["targets"]} == {"healthy"}
    assert {e.event for e in events} == {"device", "status"}


def test_each_device_event_is_one_state_move_with_an_increasing_id(streamed):
    device_events = moves(streamed["events"])
    ids = [e.id for e in device_events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and None not in ids
    by_device: dict[str, list[dict]] = {}
    for e in device_events:
        assert e.data["rollout_id"] == streamed["rid"] and e.data["id"] == e.id
        assert set(e.data) == {"id", "rollout_id", "device", "from", "to", "reason", "at"}
        by_device.setdefault(e.data["device"], []).append(e.data)
    assert len(by_device) == DEVICES
    for chain in by_device.values():
        assert (chain[0]["from"], chain[0]["to"]) == (None, "pending")
        assert chain[-1]["to"] == "healthy"
        assert all(a["to"] == b["from"] for a, b in zip(chain, chain[1:], strict=False)), chain
        assert all(a["from"] != a["to"] for a in chain)
        times = [datetime.fromisoformat(a["at"]) for a in chain]
        assert times == sorted(times) and all(t.tzinfo is not None for t in times)


def test_device_events_arrive_before_the_status_they_led_to(streamed):
    events = streamed["events"]
    last_move = max(i for i, e in enumerate(events) if e.event == "device")
    statuses = [i for i, e in enumerate(events) if e.event == "status"]
    assert statuses[-1] > last_move and len(statuses) >= 2  # the first one, then changes


def test_a_client_resuming_with_last_event_id_gets_exactly_what_it_missed(streamed):
    device_events = moves(streamed["events"])
    cut = len(device_events) // 2
    resumed = list(streamed["api"].events(f"/api/v1/rollouts/{streamed['rid']}/stream",
                                          last_event_id=device_events[cut].id))
    assert [(e.id, e.data) for e in moves(resumed)] == \
        [(e.id, e.data) for e in device_events[cut + 1:]]
    assert resumed[-1].event == "status" and resumed[-1].data["state"] == "completed"
    everything = list(streamed["api"].events(f"/api/v1/rollouts/{streamed['rid']}/stream",
                                             last_event_id=0))
    assert [e.id for e in moves(everything)] == [e.id for e in device_events]


def test_a_bad_last_event_id_is_refused_with_a_problem(streamed):
    reply = streamed["api"].get(f"/api/v1/rollouts/{streamed['rid']}/stream",
                                headers={"Last-Event-ID": "yesterday"})
    assert reply.status == 400 and "Last-Event-ID" in reply.problem["detail"]


def test_a_rollouts_events_are_dropped_a_week_after_it_ended(rollout_lab, onnx_pair, lab_db_url):
    lab = rollout_lab(onnx_pair(0.3), db_url=lab_db_url, start=False)
    lab.group("nobody", hw="none")
    with lab.store.session() as s:
        old, new = (create_rollout(s, f"detector:{v}", "nobody", "test", allow_empty=True).id
                    for v in ("v1", "v2"))
        for rid in (old, new):
            s.add(RolloutEvent(rollout_id=rid, device_id="d", from_state=None,
                               to_state="pending", reason="", at=utcnow()))
        ended = s.get(Rollout, old)
        ended.state = "completed"
        ended.finished_at = utcnow() - timedelta(days=ROLLOUT_EVENTS_KEPT_DAYS, minutes=1)
    with lab.store.read() as s:  # the flush that ended it saw it unfinished: kept till the next
        assert len(rollout_events(s, old)) == 1
    with lab.store.session() as s:
        s.get(Rollout, new).state = "aborted"  # a rollout ends: the old one's events go
    with lab.store.read() as s:
        assert (len(rollout_events(s, old)), len(rollout_events(s, new))) == (0, 1)
