"""Property-based fuzzing of every wire parser on both sides.

Whatever bytes or JSON a hostile peer sends, a parser either returns a value or raises one of
the package's own errors (``DeltafleetError`` subclasses) — never another exception, never a
hang (``deadline``).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltafleet.shared import (
    Ack,
    ArtifactRef,
    ChunkRequest,
    DeltafleetError,
    Event,
    Hello,
    KeyList,
    Manifest,
    ModelTelemetry,
    RootMetadata,
    SigningKey,
    Status,
    Telemetry,
    Topics,
    TrustBundle,
    TrustStore,
    canonical_json,
    decode,
    sha256_bytes,
    sign_payload,
    verify_envelope,
)
from tests import factories

FUZZ = settings(max_examples=100, deadline=500,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NOW = 1_700_000_000
SHA = sha256_bytes(b"x")
ROOT = SigningKey.generate()
ONLINE = SigningKey.generate()
ROOT_ENV = sign_payload(RootMetadata(1, {ROOT.keyid: ROOT.public_key}).to_wire(), [ROOT])
KEYLIST_ENV = sign_payload(
    KeyList(1, NOW - 10, NOW + 10**6, {ONLINE.keyid: ONLINE.public_key}).to_wire(), [ROOT])

# JSON values, biased towards what the parsers look at: field names, types, version numbers.
FIELD_NAMES = st.sampled_from([
    "v", "type", "device_id", "payload", "signatures", "keyid", "sig", "serial", "artifact",
    "chunks", "size_bytes", "chunk_size_bytes", "kind", "codec", "sha256", "models", "labels",
    "profile", "indices", "online", "state", "version", "keys", "threshold", "expires_at",
    "issued_at", "roots", "keylist", "health", "health_policy", "io_signature",
    "golden_inputs", "base_sha256", "target_sha256", "format", "event_id", "model",
]) | st.text(max_size=8)
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-2, 2)
           | st.floats(allow_nan=True) | st.text(max_size=20)
           | st.sampled_from([SHA, "dev-1", "manifest", "onnx", "delta", "full", "hello", 1]))
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(FIELD_NAMES, inner, max_size=6),
    max_leaves=30,
)
OBJECTS = st.dictionaries(FIELD_NAMES, JSON, max_size=10)


def _valid_wire() -> dict[str, dict[str, Any]]:
    artifact = ArtifactRef("full", "identity", SHA, 10, 65536, (SHA,))
    manifest = factories.manifest(manifest_id="m", issued_at=NOW, expires_at=NOW + 100,
                                  rollout_id=None, model="det", version="v1",
                                  target_sha256=SHA, target_size_bytes=10, artifact=artifact)
    return {
        "manifest": manifest.to_wire(),
        "hello": Hello("dev-1", "1.0", {}, {}, ()).to_wire(),
        "event": Event("e", "dev-1", None, None, "det", "v1", "healthy").to_wire(),
        "chunkreq": ChunkRequest("dev-1", SHA, (0, 1)).to_wire(),
        "status": Status("dev-1", True).to_wire(),
        "ack": Ack("dev-1", ("e1", "e2")).to_wire(),
        "telemetry": Telemetry("tm-1", "dev-1", "b1", 1, NOW, 60, 1 << 20, (
            ModelTelemetry("det", "v1", "default", 3, 1, 1, 1, 1, 0, 990_000, 1, 900,
                           (1, 1) + (0,) * 11),)).to_wire(),
    }


VALID = _valid_wire()


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """A valid message with some fields replaced, removed or added: structured but wrong."""
    d = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["set", "drop", "add", "nested"]))
        if action == "drop" and d:
            d.pop(draw(st.sampled_from(sorted(d))))
        elif action == "set" and d:
            d[draw(st.sampled_from(sorted(d)))] = draw(JSON)
        elif action == "nested" and isinstance(d.get("artifact"), dict) and d["artifact"]:
            art = d["artifact"]
            art[draw(st.sampled_from(sorted(art)))] = draw(JSON)
        else:
            d[draw(FIELD_NAMES)] = draw(JSON)
    return d


def only_own_errors(fn, *args) -> None:
    with contextlib.suppress(DeltafleetError):
        fn(*args)


def signed(payload: dict[str, Any], *extra: SigningKey) -> dict[str, Any]:
    """Sign even a payload canonical JSON refuses (floats), as a hostile signer could."""
    try:
        return sign_payload(payload, [ROOT, *extra])
    except DeltafleetError:
        return {"v": 1, "payload": payload, "signatures": [{"keyid": ROOT.keyid, "sig": "AA=="}]}


def as_bytes(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


DEVICE_MESSAGES = [Hello, Event, ChunkRequest, Status, Ack]  # Ack: server -> device


# -- device -> server ---------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=2048), st.sampled_from(DEVICE_MESSAGES))
def test_device_message_parsers_survive_arbitrary_bytes(data: bytes, cls) -> None:
    only_own_errors(decode, cls, data)


@FUZZ
@given(OBJECTS, st.sampled_from(DEVICE_MESSAGES))
def test_device_message_parsers_survive_arbitrary_json_objects(obj: dict, cls) -> None:
    only_own_errors(decode, cls, as_bytes(obj))


@FUZZ
@given(st.data(), st.sampled_from(["hello", "event", "chunkreq", "status", "ack", "telemetry"]))
def test_device_message_parsers_survive_mutated_valid_messages(data: st.DataObject,
                                                               kind: str) -> None:
    cls = {"hello": Hello, "event": Event, "chunkreq": ChunkRequest, "status": Status,
           "ack": Ack, "telemetry": Telemetry}[kind]
    only_own_errors(decode, cls, as_bytes(data.draw(mutated(VALID[kind]))))


# -- server -> device ---------------------------------------------------------------------------
@FUZZ
@given(st.data())
def test_manifest_parser_survives_mutated_manifests(data: st.DataObject) -> None:
    only_own_errors(Manifest.from_wire, data.draw(mutated(VALID["manifest"])))


@FUZZ
@given(OBJECTS)
def test_manifest_parser_survives_arbitrary_json_objects(obj: dict) -> None:
    only_own_errors(decode, Manifest, as_bytes(obj))


@FUZZ
@given(st.binary(max_size=2048) | OBJECTS.map(as_bytes))
def test_verify_envelope_survives_arbitrary_input(data: bytes) -> None:
    only_own_errors(verify_envelope, data, [ONLINE.public_key])


@FUZZ
@given(st.data())
def test_verify_envelope_survives_mutated_envelopes(data: st.DataObject) -> None:
    env = ONLINE.sign(VALID["manifest"])
    env = data.draw(mutated(env))
    if isinstance(env.get("signatures"), list) and data.draw(st.booleans()):
        env["signatures"].append(data.draw(JSON))
    only_own_errors(verify_envelope, as_bytes(env), [ONLINE.public_key])


# -- trust ----------------------------------------------------------------------------------------
def _store() -> TrustStore:
    s = TrustStore.pin(ROOT_ENV)
    s.update_keylist(KEYLIST_ENV, NOW)
    return s


@FUZZ
@given(st.binary(max_size=2048) | OBJECTS.map(as_bytes))
def test_trust_parsers_survive_arbitrary_input(data: bytes) -> None:
    only_own_errors(TrustStore.pin, data)
    only_own_errors(TrustBundle.from_bytes, data)
    only_own_errors(TrustStore.from_state, data)
    s = _store()
    only_own_errors(s.update_keylist, data, NOW)
    only_own_errors(s.update_root, data)
    only_own_errors(s.apply_bundle, data, NOW)
    only_own_errors(s.verify_manifest_envelope, data, NOW)


@FUZZ
@given(st.data(), st.sampled_from(["root", "keylist", "bundle"]))
def test_trust_parsers_survive_mutated_metadata(data: st.DataObject, kind: str) -> None:
    s = _store()
    if kind == "root":
        payload = data.draw(mutated(ROOT_ENV["payload"]))
        env = data.draw(mutated(signed(payload))) if data.draw(st.booleans()) else signed(payload)
        only_own_errors(TrustStore.pin, as_bytes(env))
        only_own_errors(s.update_root, as_bytes(env))
    elif kind == "keylist":
        payload = data.draw(mutated(KEYLIST_ENV["payload"]))
        only_own_errors(s.update_keylist, as_bytes(signed(payload)), NOW)
    else:
        bundle = data.draw(mutated(s.bundle().to_wire()))
        only_own_errors(s.apply_bundle, as_bytes(bundle), NOW)
    # whatever happened, the store still refuses nothing it accepted before
    assert s.verify_manifest_envelope(ONLINE.sign_bytes({"x": 1}), NOW) == {"x": 1}


# -- topics ---------------------------------------------------------------------------------------
TOPIC_TEXT = st.text(max_size=80) | st.builds(
    lambda mid, tail: f"deltafleet/v1/{mid}/{tail}",
    st.sampled_from(["dev", "art", "dev/x", "art/" + SHA]), st.text(max_size=40))


@FUZZ
@given(TOPIC_TEXT)
def test_topic_parsers_survive_arbitrary_topics(topic: str) -> None:
    only_own_errors(Topics().parse_dev, topic)
    only_own_errors(Topics().parse_chunk, topic)


def test_the_fuzzed_valid_messages_really_are_valid() -> None:
    """Sanity: the mutation bases parse, so mutations explore the neighbourhood of valid."""
    for kind, cls in [("hello", Hello), ("event", Event), ("chunkreq", ChunkRequest),
                      ("status", Status), ("ack", Ack), ("telemetry", Telemetry)]:
        decode(cls, canonical_json(VALID[kind]))
    Manifest.from_wire(VALID["manifest"])
    assert verify_envelope(ONLINE.sign_bytes(VALID["manifest"]), [ONLINE.public_key])
