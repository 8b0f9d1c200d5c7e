"""ingest.fits_store: a device message either fits the store as it is or is refused with a
one-line UnstorableMessage; nothing else is ever raised, whatever text a device sends."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltafleet.server.ingest import (
    EVENT_ID_CHARS,
    MODEL_NAME_CHARS,
    PROFILE_TEXT,
    UnstorableMessage,
    fits_store,
)
from deltafleet.server.store.models import Device, DeviceEvent, DeviceModel
from deltafleet.shared import ChunkRequest, Event, Hello, ModelState, Status, WireError, decode

SHA = "a" * 64

# Any code point, plus the ones that broke the store: lone surrogates and NUL.
hostile_char = st.one_of(st.characters(), st.sampled_from(["\ud800", "\udfff", "\x00"]))
hostile_text = st.text(hostile_char, max_size=150)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), hostile_text,
                      st.floats(allow_nan=True, allow_infinity=True))
hostile_json = st.recursive(json_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(hostile_text, kids, max_size=4)), max_leaves=20)


def hello_wire(**over: Any) -> dict[str, Any]:
    d = Hello("dev-1", "0.1.0", {"arch": "x86_64", "os": "Linux 6.1", "cpu": "x86_64",
                                 "memory_bytes": 8 << 30, "accelerator": None,
                                 "runtimes": {"onnxruntime": "1.18.0"},
                                 "disk_free_bytes": 1 << 30, "hardware_id": "hw-1"},
              {"site": "berlin"}, (ModelState("detector", "v1", SHA),)).to_wire()
    d.update(over)
    return d


def event_wire(**over: Any) -> dict[str, Any]:
    d = Event("e" * 32, "dev-1", "m" * 32, 1, "detector", "v2", "healthy").to_wire()
    d.update(over)
    return d


def check(cls: type, wire: dict[str, Any]) -> Any:
    """Through the bytes a device would send (json escapes keep lone surrogates as \\ud800)."""
    message = decode(cls, json.dumps(wire).encode())
    fits_store(message)
    return message


def refusal(cls: type, wire: dict[str, Any]) -> str:
    with pytest.raises(UnstorableMessage) as e:
        check(cls, wire)
    assert "\n" not in str(e.value)
    return str(e.value)


def all_text(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in all_text(k) + all_text(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in all_text(v)]
    return []


def test_limits_are_the_model_columns_not_copies() -> None:
    assert PROFILE_TEXT["cpu"] == Device.__table__.c.cpu.type.length == 128
    assert PROFILE_TEXT["arch"] == Device.__table__.c.arch.type.length
    assert EVENT_ID_CHARS == DeviceEvent.__table__.c.event_id.type.length == 64
    assert DeviceModel.__table__.c.model_name.type.length == MODEL_NAME_CHARS


def test_a_good_hello_event_status_and_chunk_request_fit() -> None:
    check(Hello, hello_wire())
    check(Event, event_wire())
    check(Event, event_wire(event_id="x" * EVENT_ID_CHARS))  # exactly the column: fits
    check(Status, {"v": 1, "type": "status", "device_id": "dev-1", "online": True})
    check(ChunkRequest, {"v": 1, "type": "chunkreq", "device_id": "dev-1",
                         "artifact_sha256": SHA, "indices": [0, 5]})


def test_a_rejection_of_an_unreadable_manifest_fits() -> None:
    wire = Event("r" * 32, "dev-1", None, None, "detector", None, "rejected",
                 reason="manifest signature invalid", sha256=SHA).to_wire()
    assert wire["version"] == "?"
    message = check(Event, wire)
    assert message.version is None and message.state == "rejected"


def test_lone_surrogate_in_the_profile_is_refused() -> None:
    profile = hello_wire()["profile"] | {"cpu": "\ud800"}
    assert "surrogate" in refusal(Hello, hello_wire(profile=profile))


def test_nul_anywhere_is_refused() -> None:
    assert "NUL" in refusal(Hello, hello_wire(labels={"site": "ber\x00lin"}))
    assert "NUL" in refusal(Hello, hello_wire(profile={"extra": {"k\x00": 1}}))
    assert "NUL" in refusal(Event, event_wire(reason="disk\x00full"))


def test_over_long_ids_and_names_are_refused_never_cut() -> None:
    assert "event_id" in refusal(Event, event_wire(event_id="x" * (EVENT_ID_CHARS + 1)))
    assert "event_id" in refusal(Event, event_wire(event_id=""))
    assert "model" in refusal(Event, event_wire(model="m" * (MODEL_NAME_CHARS + 1)))
    assert "manifest_id" in refusal(Event, event_wire(manifest_id="m" * 33))
    models = [ModelState("d" * (MODEL_NAME_CHARS + 1), "v1", SHA).to_wire()]
    assert "model name" in refusal(Hello, hello_wire(models=models))
    assert "over the 128" in refusal(Hello, hello_wire(profile={"cpu": "c" * 129}))
    with pytest.raises(WireError):  # device ids: the parser's own 64-character rule
        check(Event, event_wire(device_id="d" * 65))


def test_wrong_types_and_out_of_range_integers_are_refused() -> None:
    assert "text" in refusal(Hello, hello_wire(profile={"cpu": {"model": "x"}}))
    assert "integer" in refusal(Hello, hello_wire(profile={"memory_bytes": "8G"}))
    assert "integer" in refusal(Hello, hello_wire(profile={"memory_bytes": True}))
    assert "range" in refusal(Hello, hello_wire(profile={"disk_free_bytes": 2**63}))
    assert "range" in refusal(Event, event_wire(health={"p95_us": -(2**63) - 1}))
    assert "object" in refusal(Hello, hello_wire(profile={"runtimes": ["onnxruntime"]}))
    assert "range" in refusal(ChunkRequest, {"v": 1, "type": "chunkreq", "device_id": "dev-1",
                                             "artifact_sha256": SHA, "indices": [2**64]})


def test_deep_or_huge_profiles_are_refused() -> None:
    deep: Any = "x"
    for _ in range(10):
        deep = {"k": deep}
    assert "nested deeper" in refusal(Hello, hello_wire(profile={"extra": deep}))
    assert "more than" in refusal(Hello, hello_wire(profile={str(i): i for i in range(600)}))
    assert "finite" in refusal(Hello, hello_wire(profile={"load": float("nan")}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=hostile_text, field=st.sampled_from(
    ["agent_version", "cpu", "os", "arch", "accelerator", "hardware_id", "label", "label_key",
     "runtime", "model", "version", "variant"]))
def test_random_text_in_any_hello_field_fits_or_is_refused_with_a_wire_error(
        text: str, field: str) -> None:
    wire = hello_wire()
    if field == "agent_version":
        wire["agent_version"] = text
    elif field in PROFILE_TEXT:
        wire["profile"][field] = text
    elif field == "label":
        wire["labels"] = {"site": text}
    elif field == "label_key":
        wire["labels"] = {text: "x"}
    elif field == "runtime":
        wire["profile"]["runtimes"] = {text: text}
    else:
        wire["models"][0][field] = text
    try:
        message = check(Hello, wire)
    except WireError:
        return
    for t in all_text([message.agent_version, message.profile, message.labels,
                       [m.to_wire() for m in message.models]]):
        assert "\x00" not in t
        t.encode("utf-8")  # never raises for a message that fits


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=hostile_text, field=st.sampled_from(
    ["event_id", "manifest_id", "model", "version", "reason", "health_key"]))
def test_random_text_in_any_event_field_fits_or_is_refused_with_a_wire_error(
        text: str, field: str) -> None:
    wire = event_wire(**({"health": {text: 1}} if field == "health_key" else {field: text}))
    try:
        message = check(Event, wire)
    except WireError:
        return
    assert len(message.event_id) <= EVENT_ID_CHARS
    for t in all_text([message.event_id, message.manifest_id, message.model, message.version,
                       message.reason, message.health]):
        assert "\x00" not in t
        t.encode("utf-8")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra=hostile_json)
def test_random_json_in_the_profile_fits_or_is_refused_with_a_wire_error(extra: Any) -> None:
    wire = hello_wire()
    wire["profile"]["extra"] = extra
    try:
        check(Hello, wire)
    except WireError:
        return
    json.dumps(extra, allow_nan=False).encode("utf-8")  # storable: finite, encodable
    assert all("\x00" not in t for t in all_text(extra))
