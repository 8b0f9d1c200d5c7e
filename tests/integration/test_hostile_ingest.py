"""No device message can crash the server or cost another device its data (issue 11, item 1).

A real FleetServer (in a thread, or the `fleetctl server` process) on a real Mosquitto, on
SQLite and PostgreSQL. The server's loop is held while the test publishes, so that hostile
messages and other devices' good ones arrive in ONE batch: each hostile message is refused
alone (counted for its device, with a reason), the server keeps running, and every good
message in the same batch lands in the database exactly once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from deltafleet.server.config import ServerConfig
from deltafleet.server.daemon import FleetServer
from deltafleet.server.store import Store, upgrade
from deltafleet.server.store.models import Device, DeviceEvent, DeviceModel
from deltafleet.shared import Event, Hello, ModelState, SigningKey, Status, encode
from deltafleet.shared.mqtt import MqttClient, MqttSettings

pytestmark = pytest.mark.broker

SHA = "a" * 64
PREFIX_64 = "p" * 64  # an event id exactly the column's size ...
COLLIDING = PREFIX_64 + "-longer"  # ... and one that shares its first 64 characters


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/db/fleet.db"
    return str(request.getfixturevalue("pg_url"))


class HeldServer:
    """A real FleetServer whose loop waits at its first drain until ``release()``: whatever
    the test published by then is handled as one batch."""

    def __init__(self, root: Path, broker_url: str, db_url: str) -> None:
        self.cfg = ServerConfig(home=root / "home", db_url=db_url, mqtt_url=broker_url,
                                topic_prefix=f"t{uuid.uuid4().hex[:8]}/v1")
        upgrade(db_url)
        SigningKey.generate().save(self.cfg.signing_key_path, self.cfg.public_key_path)
        self.store = Store(db_url)
        self.server = FleetServer(self.cfg, Store(db_url))
        self.topics = self.server.topics
        self.gate = threading.Event()
        self.batches: list[list[str]] = []
        drain = self.server._drain

        def held_drain(timeout_s: float, linger_s: float = 0.0) -> list[tuple[str, bytes]]:
            self.gate.wait()
            batch = drain(timeout_s, linger_s)
            if batch:
                self.batches.append([t for t, _ in batch if not t.startswith("$")])
            return batch

        self.server._drain = held_drain  # type: ignore[method-assign]
        self.handled = threading.Event()  # set once the held batch has been handled
        handle = self.server._handle_with_retry

        def handle_and_tell(batch: list[tuple[str, bytes]]) -> None:
            try:
                handle(batch)
            finally:
                self.handled.set()

        self.server._handle_with_retry = handle_and_tell  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.server.mqtt.wait_connected(15)
        self.device = MqttClient(MqttSettings(broker_url, f"devices-{uuid.uuid4().hex[:6]}"))
        self.device.start()
        self.device.wait_connected(15)
        self._subscribed()

    def _subscribed(self) -> None:
        """Until the server's subscriptions are in place, a publish may reach nobody: probe."""
        deadline = time.monotonic() + 30
        while self.server.mqtt.inbox.qsize() < 2:  # (CONNECTED) + a probe
            assert time.monotonic() < deadline, "the server never received a probe"
            self.device.publish_wait(self.topics.status("probe"),
                                     encode(Status("probe", True)))
            time.sleep(0.3)  # probe pacing: one probe per 0.3 s until one arrives

    def send(self, messages: list[tuple[str, bytes]]) -> int:
        """Publish while the loop is held; wait until all are in the server's inbox; let go.
        Returns how many device messages the held batch holds."""
        before = self.server.mqtt.inbox.qsize()
        for topic, payload in messages:
            self.device.publish_wait(topic, payload)
        wait_for(lambda: self.server.mqtt.inbox.qsize() >= before + len(messages), 60,
                 "every message in the server's inbox")
        total = self.server.mqtt.inbox.qsize() - 1  # less the CONNECTED marker
        self.gate.set()
        assert self.handled.wait(60), "the held batch was never handled"
        assert len(self.batches[0]) == total, "the messages were not handled as one batch"
        return total

    def hello(self, device_id: str, **profile: Any) -> tuple[str, bytes]:
        p = {"arch": "x86_64", "os": "Linux 6.1", "cpu": "x86_64", "memory_bytes": 1 << 30,
             **profile}
        return self.topics.hello(device_id), encode(
            Hello(device_id, "0.1.0", p, {"site": "lab"}, (ModelState("detector", "v1", SHA),)))

    def event(self, device_id: str, event_id: str, **fields: Any) -> tuple[str, bytes]:
        ev = Event(event_id, device_id, None, None, "detector", "v1", "downloading").to_wire()
        ev.update(fields)
        return self.topics.events(device_id), json.dumps(ev).encode()

    def raw(self, leaf: str, device_id: str, wire: dict[str, Any]) -> tuple[str, bytes]:
        # json.dumps escapes a lone surrogate as \\ud800: the bytes a device can really send
        return self.topics.dev(device_id, leaf), json.dumps(wire).encode()

    def refusals(self, device_id: str) -> tuple[dict[str, int], str]:
        rec = self.server.guard.snapshot(device_id)
        assert rec is not None, f"nothing counted for {device_id}"
        return dict(rec.refusals), rec.last_reason

    def event_rows(self) -> dict[str, tuple[str, int]]:
        with self.store.session() as s:
            rows = s.execute(select(DeviceEvent.event_id, DeviceEvent.device_id,
                                    func.count()).group_by(DeviceEvent.event_id,
                                                           DeviceEvent.device_id)).all()
        return {e: (d, n) for e, d, n in rows}

    def devices(self) -> set[str]:
        with self.store.session() as s:
            return set(s.scalars(select(Device.id)))

    def close(self) -> None:
        self.gate.set()
        self.server.stop_event.set()
        self.thread.join(15)
        self.device.stop()
        self.server.store.dispose()
        self.store.dispose()


def wait_for(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)  # poll pacing
    return value


@pytest.fixture
def held(tmp_path: Path, broker, db_url: str) -> Iterator[HeldServer]:
    h = HeldServer(tmp_path, broker.url, db_url)
    yield h
    h.close()


def hello_wire(h: HeldServer, device: str, **over: Any) -> dict[str, Any]:
    return json.loads(h.hello(device)[1]) | over


def test_each_unstorable_message_is_refused_alone_and_the_others_in_its_batch_land_once(
        held: HeldServer) -> None:
    h = held
    deep: Any = "x"
    for _ in range(40):
        deep = {"d": deep}
    profile = json.loads(h.hello("x")[1])["profile"]
    hostile = {  # device -> (message, the reason it must be refused for)
        "evil-surrogate": (h.raw("hello", "evil-surrogate", hello_wire(
            h, "evil-surrogate", profile=profile | {"cpu": "\ud800"})), "surrogate"),
        "evil-nul": (h.raw("hello", "evil-nul", hello_wire(
            h, "evil-nul", labels={"site": "b\x00d"})), "NUL"),
        "evil-nul-event": (h.event("evil-nul-event", "e-nul", reason="disk\x00full"), "NUL"),
        "evil-long-device": (h.raw("hello", "evil-long-device", hello_wire(
            h, "evil-long-device", device_id="d" * 65)), "invalid device id"),
        "evil-long-event": (h.event("evil-long-event", "e" * 200), "event_id"),
        "evil-collide": (h.event("evil-collide", COLLIDING), "event_id"),
        "evil-long-model": (h.event("evil-long-model", "e-model", model="m" * 129), "model"),
        "evil-long-cpu": (h.raw("hello", "evil-long-cpu", hello_wire(
            h, "evil-long-cpu", profile=profile | {"cpu": "c" * 129})), "128"),
        "evil-types": (h.raw("hello", "evil-types", hello_wire(
            h, "evil-types", profile=profile | {"memory_bytes": "lots"})), "integer"),
        "evil-bigint": (h.raw("hello", "evil-bigint", hello_wire(
            h, "evil-bigint", profile=profile | {"disk_free_bytes": 2**64})), "range"),
        "evil-deep": (h.raw("hello", "evil-deep", hello_wire(
            h, "evil-deep", profile=profile | {"extra": deep})), "nested"),
    }
    good = [f"good-{i}" for i in range(4)]
    batch: list[tuple[str, bytes]] = []
    for i, device in enumerate(good):  # hostile messages interleaved with the good ones
        batch.append(h.hello(device))
        batch += [m for m, _ in list(hostile.values())[i::len(good)]]
        batch.append(h.event(device, f"{device}-downloading"))
        batch.append(h.event(device, f"{device}-downloading"))  # re-sent: applied once
        batch.append(h.event(device, f"{device}-applying", state="applying", sha256=SHA))
    batch.append(h.event("good-0", PREFIX_64))  # shares 64 characters with evil-collide's
    invalid_before = h.server.stats.invalid_messages
    h.send(batch)

    assert h.thread.is_alive()
    assert h.server.stats.invalid_messages - invalid_before == len(hostile)
    for device, (_, reason) in hostile.items():
        kinds, last = h.refusals(device)
        assert sum(kinds.values()) == 1, (device, kinds)
        assert reason in last, (device, last)
    assert h.refusals("evil-long-device")[0] == {"malformed": 1}  # the parser's own rule
    assert h.refusals("evil-surrogate")[0] == {"unstorable": 1}
    assert h.devices() == {*good}
    expected = {f"{d}-{s}": (d, 1) for d in good for s in ("downloading", "applying")}
    expected[PREFIX_64] = ("good-0", 1)
    assert h.event_rows() == expected  # every good event once, no hostile one, none cut
    with h.store.session() as s:  # the applying event recorded the model each device runs
        assert set(s.scalars(select(DeviceModel.device_id))) == {*good}
    assert h.server.stats.duplicate_events == len(good)

    # and the server keeps serving: a later hello from a newcomer lands
    h.device.publish_wait(*h.hello("late"))
    wait_for(lambda: "late" in h.devices(), 30, "a later hello applied")


def _poison(store: Store) -> None:
    """A rule in the database the validator cannot know: rows of device 'poisoned' are refused."""
    with store.session() as s:
        if s.get_bind().dialect.name == "sqlite":
            s.execute(text(
                "CREATE TRIGGER poison BEFORE INSERT ON device_events "
                "WHEN NEW.device_id = 'poisoned' BEGIN SELECT RAISE(ABORT, 'poisoned'); END"))
        else:
            s.execute(text(
                "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN "
                "IF NEW.device_id = 'poisoned' THEN RAISE EXCEPTION 'poisoned'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"))
            s.execute(text("CREATE TRIGGER poison BEFORE INSERT ON device_events FOR EACH ROW "
                           "EXECUTE FUNCTION refuse_poison()"))


def test_a_batch_the_database_refuses_is_applied_message_by_message(held: HeldServer,
                                                                   caplog) -> None:
    h = held
    _poison(h.store)
    batch = [h.hello("poisoned"), h.hello("good-a"), h.hello("good-b"),
             h.event("good-a", "a-1"), h.event("poisoned", "p-1"), h.event("good-b", "b-1"),
             h.raw("status", "good-b", {"v": 1, "type": "status", "device_id": "good-b",
                                        "online": False})]
    with caplog.at_level(logging.WARNING, logger="deltafleet.server.daemon"):
        h.send(batch)
    assert h.thread.is_alive()
    assert h.event_rows() == {"a-1": ("good-a", 1), "b-1": ("good-b", 1)}
    assert h.devices() == {"poisoned", "good-a", "good-b"}  # its hello was fine
    kinds, reason = h.refusals("poisoned")
    assert kinds == {"store_refused": 1} and "poisoned" in reason
    assert any("poisoned" in r.getMessage() and "dropped" in r.getMessage()
               for r in caplog.records if r.levelno >= logging.ERROR)
    with h.store.session() as s:  # the status after good-b's hello still applied, in order
        assert s.get(Device, "good-b").online is False  # type: ignore[union-attr]


def test_an_unexpected_error_costs_one_message_never_the_server(held: HeldServer,
                                                                caplog) -> None:
    h = held
    on_event = h.server.controller.on_event

    def buggy_on_event(s, ev, now):  # a server bug that one device's message trips
        if ev.device_id == "boom":
            raise RuntimeError("bug tripped by this message")
        return on_event(s, ev, now)

    h.server.controller.on_event = buggy_on_event  # type: ignore[method-assign]
    reconcile_calls: list[float] = []
    reconcile = h.server.reconcile

    def failing_once() -> None:  # the run loop survives an error outside message handling
        reconcile_calls.append(time.monotonic())
        if len(reconcile_calls) == 1:
            raise RuntimeError("reconcile bug")
        reconcile()

    h.server.reconcile = failing_once  # type: ignore[method-assign]
    batch = [h.hello("boom"), h.hello("fine"), h.event("boom", "boom-1"),
             h.event("fine", "fine-1")]
    with caplog.at_level(logging.WARNING, logger="deltafleet.server.daemon"):
        h.send(batch)
        wait_for(lambda: len(reconcile_calls) >= 2, 30, "the loop to go on after the error")
    assert h.thread.is_alive()
    assert h.event_rows() == {"fine-1": ("fine", 1)}
    assert h.devices() == {"boom", "fine"}
    assert h.refusals("boom")[0] == {"error": 1}
    assert any("boom" in r.getMessage() for r in caplog.records if r.exc_info)


def test_fleetctl_server_survives_a_hello_with_a_lone_surrogate(tmp_path: Path, broker) -> None:
    """The report's reproduction (a small hello, `"cpu": "\\ud800"`), against the real
    `fleetctl server` process: it keeps running and serves the next device."""
    from tests.harness.fleetlab import Lab

    lab = Lab(tmp_path / "lab", mqtt_url=broker.url)
    prefix = f"t{uuid.uuid4().hex[:8]}/v1"
    lab.env["FLEET_TOPIC_PREFIX"] = prefix
    lab.fleetctl("init")
    client = MqttClient(MqttSettings(broker.url, f"attacker-{uuid.uuid4().hex[:6]}"))
    try:
        server = lab.start_server()
        client.start()
        client.wait_connected(15)
        hostile = (b'{"v":1,"type":"hello","device_id":"evil","agent_version":"0.1.0",'
                   b'"profile":{"arch":"x86_64","os":"Linux","cpu":"\\ud800"},"labels":{},'
                   b'"models":[],"sent_at":1700000000}')
        good = encode(Hello("good", "0.1.0", {"arch": "x86_64"}, {}, ()))
        deadline = time.monotonic() + 60
        while "good" not in {d["id"] for d in lab.fleetctl_json("device", "list")}:
            assert server.poll() is None, lab.log("server")
            assert time.monotonic() < deadline, lab.log("server")
            client.publish_wait(f"{prefix}/dev/evil/hello", hostile)
            client.publish_wait(f"{prefix}/dev/good/hello", good)
            time.sleep(0.5)  # re-send pacing: until the server is subscribed and "good" is in
        assert server.poll() is None
        assert "evil" not in {d["id"] for d in lab.fleetctl_json("device", "list")}
        assert "surrogate" in lab.log("server")
    finally:
        client.stop()
        lab.close()
