"""Wire formats and signatures: what server and agent must agree on byte for byte."""

from __future__ import annotations

import pytest

from deltafleet.shared import (
    SigningKey,
    Topics,
    VerificationError,
    WireError,
    canonical_json,
    decode,
    encode,
    sha256_bytes,
    verify_envelope,
)
from deltafleet.shared import messages as msgs
from deltafleet.shared.messages import MAX_ACK_BYTES, MAX_ACK_IDS
from tests import factories

SHA_A = sha256_bytes(b"a")
SHA_B = sha256_bytes(b"b")


def manifest(**overrides) -> msgs.Manifest:
    fields = dict(
        serial=3, issued_at=100, expires_at=10**10, rollout_id=7, model="detector",
        target_sha256=SHA_B, target_size_bytes=10, base_sha256=SHA_A,
        artifact=msgs.ArtifactRef("delta", "bsdiff4", SHA_A, 5, 65536, (SHA_A,)),
    )
    return factories.manifest(**{**fields, **overrides})


def test_canonical_json_sorts_keys_and_drops_whitespace():
    assert canonical_json({"b": 1, "a": [True, None, "é"]}) == '{"a":[true,null,"é"],"b":1}'.encode()


def test_canonical_json_refuses_floats():
    with pytest.raises(WireError):
        canonical_json({"x": 1.5})


def test_manifest_round_trips_through_the_wire():
    m = manifest()
    assert msgs.Manifest.from_wire(m.to_wire()) == m


def test_signed_manifest_verifies_with_the_signing_key():
    key = SigningKey.generate()
    payload = verify_envelope(key.sign_bytes(manifest().to_wire()), [key.public_key])
    assert msgs.Manifest.from_wire(payload) == manifest()


def test_manifest_signed_by_another_key_is_refused():
    key, other = SigningKey.generate(), SigningKey.generate()
    with pytest.raises(VerificationError):
        verify_envelope(other.sign_bytes(manifest().to_wire()), [key.public_key])


def test_tampered_payload_fails_verification():
    key = SigningKey.generate()
    data = key.sign_bytes(manifest().to_wire()).replace(b'"serial":3', b'"serial":4')
    with pytest.raises(VerificationError):
        verify_envelope(data, [key.public_key])


@pytest.mark.parametrize("data", [b"", b"not json", b"[]", b'{"v":1}', b'{"v":2,"payload":{}}',
                                  b'{"v":1,"payload":{},"signatures":[]}', b"\xff\xfe"])
def test_malformed_envelopes_raise_wire_error(data):
    with pytest.raises(WireError):
        verify_envelope(data, [SigningKey.generate().public_key])


def test_delta_manifest_without_base_is_malformed():
    wire = manifest(base_sha256=None).to_wire()
    with pytest.raises(WireError, match="base"):
        msgs.Manifest.from_wire(wire)


def test_chunk_list_must_match_artifact_size():
    wire = manifest().to_wire()
    wire["artifact"]["size_bytes"] = 65537
    with pytest.raises(WireError, match="chunk"):
        msgs.Manifest.from_wire(wire)


def test_device_messages_round_trip():
    hello = msgs.Hello("dev-1", "0.1.0", {"arch": "x86_64"}, {"hw": "jetson"},
                  (msgs.ModelState("detector", "v1", SHA_A),), sent_at=5)
    assert decode(msgs.Hello, encode(hello)) == hello
    ev = msgs.Event("e1", "dev-1", "m1", 7, "detector", "v2", "healthy", sha256=SHA_B,
               health={"p95_us": 900}, at=9)
    assert decode(msgs.Event, encode(ev)) == ev
    req = msgs.ChunkRequest("dev-1", SHA_A, (0, 3))
    assert decode(msgs.ChunkRequest, encode(req)) == req


def test_an_ack_round_trips_and_a_full_one_fits_the_size_cap():
    ack = msgs.Ack("dev-1", ("e1", "e2"))
    assert decode(msgs.Ack, encode(ack)) == ack
    full = msgs.Ack("dev-1", tuple(f"{i:064d}" for i in range(MAX_ACK_IDS)))
    assert decode(msgs.Ack, encode(full), max_bytes=MAX_ACK_BYTES) == full
    assert Topics("df/v1").ack("dev-1") == "df/v1/dev/dev-1/ack"


@pytest.mark.parametrize("payload", [
    b'{"v":1,"type":"event","device_id":"d","event_ids":["e1"]}',  # not an ack
    b'{"v":2,"type":"ack","device_id":"d","event_ids":["e1"]}',  # unknown version
    b'{"v":1,"type":"ack","device_id":"d/#","event_ids":["e1"]}',
    b'{"v":1,"type":"ack","device_id":"d","event_ids":"e1"}',
    b'{"v":1,"type":"ack","device_id":"d","event_ids":[1]}',
    b'{"v":1,"type":"ack","device_id":"d","event_ids":[""]}',
    b'{"v":1,"type":"ack","device_id":"d","event_ids":["' + b"x" * 65 + b'"]}',
    b'{"v":1,"type":"ack","device_id":"d","event_ids":[' + b",".join(
        b'"e"' for _ in range(MAX_ACK_IDS + 1)) + b']}',
])
def test_invalid_acks_are_refused(payload):
    with pytest.raises(WireError):
        decode(msgs.Ack, payload)


@pytest.mark.parametrize("payload", [
    b'{"v":1,"type":"chunkreq","device_id":"d","artifact_sha256":"x","indices":[1]}',
    b'{"v":1,"type":"chunkreq","device_id":"d/+","artifact_sha256":"' + SHA_A.encode() + b'","indices":[1]}',
    b'{"v":1,"type":"chunkreq","device_id":"d","artifact_sha256":"' + SHA_A.encode() + b'","indices":[-1]}',
    b'{"v":1,"type":"chunkreq","device_id":"d","artifact_sha256":"' + SHA_A.encode() + b'","indices":[true]}',
])
def test_invalid_chunk_requests_are_refused(payload):
    with pytest.raises(WireError):
        decode(msgs.ChunkRequest, payload)


def test_topics_confine_devices_to_their_subtree():
    t = Topics("df/v1")
    assert t.desired("dev-1", "detector") == "df/v1/dev/dev-1/desired/detector"
    assert t.parse_dev("df/v1/dev/dev-1/events") == ("dev-1", "events")
    assert t.parse_chunk(t.chunk(SHA_A, 12)) == (SHA_A, 12)
    with pytest.raises(WireError):
        t.hello("a/b")
    with pytest.raises(WireError):
        t.parse_dev("df/v1/dev/+/events")
