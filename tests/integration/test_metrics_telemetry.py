"""Device telemetry on the server: validated like every device message (refusals counted by
reason), summed into totals that only grow (cumulative summaries are differenced; duplicates
add nothing; an agent restart starts from zero), exposed without any per-device label. Run on
SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from deltafleet.server import fleet
from deltafleet.server.config import ServerConfig
from deltafleet.server.daemon import FleetServer
from deltafleet.server.metrics import apply_telemetry
from deltafleet.server.store import Store, upgrade
from deltafleet.server.store.models import Device, DeviceTelemetryModel, utcnow
from deltafleet.shared import ModelTelemetry, SigningKey, Telemetry, encode

BUCKETS = 13


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    url = (f"sqlite:///{tmp_path}/fleet.db" if request.param == "sqlite"
           else str(request.getfixturevalue("pg_url")))
    upgrade(url)
    s = Store(url)
    with s.session() as db:
        db.add(Device(id="cam-1", arch="aarch64", accelerator="cuda", labels={"hw": "jetson"},
                      runtimes={}))
        db.add(Device(id="cam-2", arch="x86_64", labels={"hw": "x86", "site": "b"}, runtimes={}))
    with s.session() as db:
        for name, selector in (("jetson", {"hw": "jetson"}), ("cuda", {"accelerator": "cuda"}),
                               ("x86-b", {"hw": ["x86", "pi"], "site": "b"}), ("all", {})):
            fleet.create_group(db, name, selector)
    yield s
    s.dispose()


def summary(seq: int, requests: int, *, boot: str = "boot-a", errors: int = 0,
            device: str = "cam-1") -> Telemetry:
    buckets = [0] * BUCKETS
    buckets[3] = requests - errors
    return Telemetry(f"tm-{boot}-{seq}", device, boot, seq, 1_700_000_000 + seq, seq * 60,
                     50_000_000, (ModelTelemetry("detector", "v2", "int8", requests, errors, 0, 1,
                                                 1, 0, 900_000, 1,
                                                 latency_sum_us=3000 * (requests - errors),
                                                 latency_buckets=tuple(buckets)),))


def totals(store: Store) -> dict[str, int]:
    with store.read() as s:
        row = s.get(DeviceTelemetryModel, ("cam-1", "detector", "v2"))
        assert row is not None
        return {"requests": row.requests, "errors": row.errors, "lat_3": row.lat_3,
                "swaps": row.swaps, "device_type": row.device_type, "variant": row.variant}


def apply(store: Store, *messages: Telemetry) -> list[str]:
    with store.session() as s:
        return [t.telemetry_id for t in apply_telemetry(s, messages, utcnow())]


def test_totals_grow_by_the_difference_between_cumulative_summaries(store):
    apply(store, summary(1, 10, errors=1))
    apply(store, summary(2, 25, errors=2))
    assert totals(store) == {"requests": 25, "errors": 2, "lat_3": 23, "swaps": 1,
                             "device_type": "aarch64/cuda", "variant": "int8"}


def test_a_summary_delivered_twice_adds_nothing(store):
    assert apply(store, summary(1, 10)) == ["tm-boot-a-1"]
    assert apply(store, summary(1, 10)) == ["tm-boot-a-1"]  # acked again, not added again
    assert totals(store)["requests"] == 10


def test_an_agent_restart_does_not_lower_the_totals(store):
    apply(store, summary(1, 10), summary(2, 30))
    apply(store, summary(1, 4, boot="boot-b"))  # counters start again at zero
    assert totals(store)["requests"] == 34
    assert totals(store)["swaps"] == 2  # one swap per boot in these summaries


def _two(seq: int, v1: int, v2: int | None) -> Telemetry:
    """A summary of v1 (and v2 unless None: left out, unchanged since the acked one)."""
    def entry(version: str, n: int) -> ModelTelemetry:
        buckets = [0] * BUCKETS
        buckets[3] = n
        return ModelTelemetry("detector", version, "int8", n, latency_sum_us=3000 * n,
                              latency_buckets=tuple(buckets))
    models = (entry("v1", v1),) + (() if v2 is None else (entry("v2", v2),))
    return Telemetry(f"tm-boot-a-{seq}", "cam-1", "boot-a", seq, 1_700_000_000 + seq, seq * 60,
                     50_000_000, models)


def _requests(store: Store, version: str) -> int:
    with store.read() as s:
        return s.get(DeviceTelemetryModel, ("cam-1", "detector", version)).requests


def test_an_entry_left_out_of_a_summary_keeps_its_counts_and_later_adds_only_the_difference(
        store):
    apply(store, _two(1, 10, 5))
    apply(store, _two(2, 20, None))  # v2 unchanged: not sent
    assert (_requests(store, "v1"), _requests(store, "v2")) == (20, 5)
    apply(store, _two(3, 20, 8))  # v2 served again: 3 more, not 8
    assert (_requests(store, "v1"), _requests(store, "v2")) == (20, 8)
    apply(store, _two(4, 20, 2))  # v2 lower in the same boot: evicted, counted from zero
    assert _requests(store, "v2") == 10


def test_a_summary_of_a_device_the_server_does_not_know_is_not_acked(store):
    assert apply(store, summary(1, 5, device="ghost")) == []


def test_the_fleet_families_carry_no_device_id(store, tmp_path: Path):
    apply(store, summary(1, 10))
    cfg = ServerConfig(home=tmp_path / "home", db_url=str(store.engine.url.render_as_string(
        hide_password=False)), mqtt_url="mqtt://127.0.0.1:1", topic_prefix="t/v1")
    SigningKey.generate().save(cfg.signing_key_path, cfg.public_key_path)
    server = FleetServer(cfg, store)
    text = generate_latest(server.metrics.registry).decode()
    assert ('deltafleet_fleet_inference_requests_total{device_type="aarch64/cuda",model="detector",'
            'variant="int8",version="v2"} 10.0') in text
    assert ('deltafleet_fleet_trial_output_agreement_ratio{device_type="aarch64/cuda",'
            'model="detector",variant="int8",version="v2"} 0.9') in text
    assert "cam-1" not in text
    groups = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'deltafleet_group_devices\{group="([^"]+)",online="false"\} (\S+)', text)}
    assert groups == {"jetson": 1, "cuda": 1, "x86-b": 1, "all": 2}


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda d: d.update(seq=-1), "malformed"),
    (lambda d: d["models"][0].update(latency_buckets=[0] * 3), "malformed"),
    (lambda d: d["models"][0].update(errors=99), "malformed"),
    (lambda d: d.update(models=[d["models"][0]] * 2), "malformed"),
    (lambda d: d["models"][0].update(requests=True), "malformed"),
    (lambda d: d["models"][0].update(model="x\x00y"), "unstorable"),
    (lambda d: d["models"][0].update(version="v" * 65), "unstorable"),
    (lambda d: d.update(device_id="cam-2"), "malformed"),  # another device's topic
])
def test_invalid_telemetry_is_refused_and_counted_by_reason(store, tmp_path: Path, mutate,
                                                            reason):
    cfg = ServerConfig(home=tmp_path / "home", db_url="sqlite://", mqtt_url="mqtt://127.0.0.1:1",
                       topic_prefix=f"t{uuid.uuid4().hex[:6]}/v1")
    SigningKey.generate().save(cfg.signing_key_path, cfg.public_key_path)
    server = FleetServer(cfg, store)
    wire = summary(1, 10).to_wire()
    mutate(wire)
    items = server._validate([(server.topics.telemetry("cam-1"), json.dumps(wire).encode())])
    assert items == []
    assert server.guard.refusals[reason] == 1
    text = generate_latest(server.metrics.registry).decode()
    assert f'deltafleet_device_messages_refused_total{{reason="{reason}"}} 1.0' in text


def test_a_valid_summary_passes_the_guard(store, tmp_path: Path):
    cfg = ServerConfig(home=tmp_path / "home", db_url="sqlite://", mqtt_url="mqtt://127.0.0.1:1",
                       topic_prefix="t/v1")
    SigningKey.generate().save(cfg.signing_key_path, cfg.public_key_path)
    server = FleetServer(cfg, store)
    items = server._validate([(server.topics.telemetry("cam-1"), encode(summary(1, 10)))])
    assert [type(m).__name__ for _, m in items] == ["Telemetry"]
    assert sum(server.guard.refusals.values()) == 0
