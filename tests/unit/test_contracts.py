"""The model contract types in deltafleet.shared: one set of health defaults, IO signatures
and golden inputs whose wire form is byte for byte what manifests carried before the types
existed, strict parsers that refuse malformed input with WireError, and typed event states."""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import fields
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltafleet.agent.config import AgentConfig
from deltafleet.agent.serving import decode_golden, golden_feeds, io_difference
from deltafleet.server.catalog import golden_input, io_signature, load_golden, signature
from deltafleet.server.policy import RolloutPolicy
from deltafleet.shared import (
    ROLLOUT_HEALTH,
    ArtifactRef,
    Event,
    EventState,
    GoldenInput,
    GoldenTensor,
    HealthPolicy,
    IoSignature,
    Manifest,
    TensorSpec,
    WireError,
    canonical_json,
    decode,
    encode,
    sha256_bytes,
)
from deltafleet.shared.messages import EVENT_STATES

SHA = sha256_bytes(b"x")

# -- HealthPolicy ---------------------------------------------------------------------------

TODAYS_SERVER_POLICY = {"max_error_rate_ppm": 10_000, "max_p95_ratio_pct": 150,
                        "min_requests": 50, "p95_slack_us": 1_000}


def test_health_defaults_are_the_devices_and_agent_config_takes_them() -> None:
    assert HealthPolicy() == HealthPolicy(10_000, 0, 20, 1_000)
    assert not HealthPolicy().judges_latency
    defaults = {f.name: f.default for f in fields(AgentConfig) if f.name.startswith("trial_")}
    assert defaults == {f"trial_{k}": v for k, v in HealthPolicy().to_wire().items()}


def test_rollout_default_is_the_policy_servers_send_today() -> None:
    assert ROLLOUT_HEALTH.to_wire() == TODAYS_SERVER_POLICY
    assert HealthPolicy.from_wire(RolloutPolicy().to_json()["health"]) == ROLLOUT_HEALTH


def test_agent_trial_health_policy_is_the_shared_one() -> None:
    from deltafleet.agent import trial

    assert trial.HealthPolicy is HealthPolicy


def test_health_policy_round_trips_todays_dict_exactly() -> None:
    policy = HealthPolicy.from_wire(TODAYS_SERVER_POLICY)
    assert policy == HealthPolicy(10_000, 150, 50, 1_000)
    assert policy.to_wire() == TODAYS_SERVER_POLICY
    assert canonical_json(policy.to_wire()) == canonical_json(TODAYS_SERVER_POLICY)


def test_health_policy_from_wire_takes_a_negative_slack_as_the_cli_does() -> None:
    assert HealthPolicy.from_wire({"p95_slack_us": -1}) == HealthPolicy(p95_slack_us=-1)
    assert HealthPolicy.from_manifest({"p95_slack_us": -1}).p95_slack_us == -1


def test_health_policy_keys_left_out_take_the_defaults() -> None:
    assert HealthPolicy.from_wire({"min_requests": 5}) == HealthPolicy(min_requests=5)
    assert HealthPolicy.from_wire({}) == HealthPolicy()


@pytest.mark.parametrize("wire, why", [
    ([], "must be an object"),
    ({"max_error_rate_ppm": 1, "max_memory_bytes": 5}, "unknown keys ['max_memory_bytes']"),
    ({"max_error_rate_ppm": True}, "must be an integer"),
    ({"max_error_rate_ppm": 1.0}, "must be an integer"),
    ({"max_p95_ratio_pct": math.nan}, "must be an integer"),
    ({"min_requests": "50"}, "must be an integer"),
    ({"min_requests": None}, "must be an integer"),
    ({"max_p95_ratio_pct": -5}, "max_p95_ratio_pct is negative"),
    ({"min_requests": 0}, "at least 1"),
])
def test_health_policy_from_wire_refuses(wire: Any, why: str) -> None:
    with pytest.raises(WireError, match=re.escape(why)):
        HealthPolicy.from_wire(wire)


def test_from_manifest_reads_a_manifest_map_leniently() -> None:
    base = HealthPolicy(1_000, 150, 20, 500)
    got = HealthPolicy.from_manifest({"max_p95_ratio_pct": -5, "min_requests": 0,
                                      "from_a_newer_server": 1}, base)
    assert got == HealthPolicy(1_000, 0, 1, 500)
    assert HealthPolicy.from_manifest({}) == HealthPolicy()
    assert HealthPolicy.from_manifest(base) is base


def test_manifest_health_reads_its_policy_with_the_devices_defaults() -> None:
    m = _manifest(health_policy={"min_requests": 7})
    assert m.health() == HealthPolicy(min_requests=7)
    assert m.health(HealthPolicy(5, 0, 9, 3)) == HealthPolicy(5, 0, 7, 3)


# -- TensorSpec / IoSignature -------------------------------------------------------------

CATALOG_INFO = {
    "inputs": [{"name": "input", "dtype": "float32", "shape": ["N", 64]},
               {"name": "ids", "dtype": "int64", "shape": [None, -1, 3]}],
    "outputs": [{"name": "out", "dtype": "float32", "shape": [1, 10]}],
}
# catalog.io_signature(CATALOG_INFO) before the shared types, canonical JSON
SIGNATURE_BYTES = (b'{"inputs":[{"dtype":"float32","name":"input","shape":[null,64]},'
                   b'{"dtype":"int64","name":"ids","shape":[null,null,3]}],'
                   b'"outputs":[{"dtype":"float32","name":"out","shape":[1,10]}]}')


def test_catalog_signature_wire_form_is_unchanged() -> None:
    sig = signature(CATALOG_INFO)
    assert sig == IoSignature(
        (TensorSpec("input", "float32", (None, 64)), TensorSpec("ids", "int64", (None, None, 3))),
        (TensorSpec("out", "float32", (1, 10)),))
    assert canonical_json(sig.to_wire()) == SIGNATURE_BYTES
    assert canonical_json(io_signature(CATALOG_INFO)) == SIGNATURE_BYTES


def test_io_signature_round_trips() -> None:
    sig = signature(CATALOG_INFO)
    assert IoSignature.from_wire(sig.to_wire()) == sig
    assert canonical_json(IoSignature.from_wire(sig.to_wire()).to_wire()) == SIGNATURE_BYTES


def test_signed_spec_drops_named_and_negative_dims() -> None:
    assert TensorSpec("x", "float32", ("batch", -1, 0, 4, None)).signed() == \
        TensorSpec("x", "float32", (None, None, 0, 4, None))


def test_signature_with_a_dtype_devices_name_differently_is_not_signed() -> None:
    info = {**CATALOG_INFO, "outputs": [{"name": "t", "dtype": "string", "shape": [None]}]}
    assert signature(info) is None and io_signature(info) is None
    assert not IoSignature.of([], [TensorSpec("t", "string", ())]).signable
    assert signature(CATALOG_INFO).signable


@pytest.mark.parametrize("wire, why", [
    ("sig", "must be an object"),
    ({"inputs": []}, "io_signature.outputs must list"),
    ({"inputs": "x", "outputs": []}, "io_signature.inputs must list"),
    ({"inputs": [{"name": "a", "dtype": "float32", "shape": ["N"]}], "outputs": []}, "inputs"),
    ({"inputs": [{"name": "a", "dtype": "float32", "shape": [True]}], "outputs": []}, "inputs"),
    ({"inputs": [{"name": "a", "dtype": "float32", "shape": [1.0]}], "outputs": []}, "inputs"),
    ({"inputs": [], "outputs": [{"dtype": "float32", "shape": []}]}, "outputs"),
    ({"inputs": [], "outputs": [{"name": "a", "dtype": 1, "shape": []}]}, "outputs"),
    ({"inputs": [], "outputs": [["a", "float32", []]]}, "outputs"),
])
def test_io_signature_from_wire_refuses(wire: Any, why: str) -> None:
    with pytest.raises(WireError, match=why):
        IoSignature.from_wire(wire)


def _sig(inputs: list[tuple], outputs: list[tuple] = (("y", "float32", (None, 2)),)) -> IoSignature:
    return IoSignature(tuple(TensorSpec(*s) for s in inputs), tuple(TensorSpec(*s) for s in outputs))


A = ("a", "float32", (None, 3))
B = ("b", "int32", (2, 5))


@pytest.mark.parametrize("left, right, diff", [
    (_sig([A, B]), _sig([B, A]), []),
    (_sig([A]), _sig([A, B]), ["inputs ['a'] != ['a', 'b']"]),
    (_sig([A]), _sig([("a", "float16", (None, 3))]), ["input 'a' dtype float32 != float16"]),
    (_sig([A]), _sig([("a", "float32", (1, 3))]), ["input 'a' shape [None, 3] != [1, 3]"]),
    (_sig([A]), _sig([("a", "int8", (4,))]),
     ["input 'a' dtype float32 != int8", "input 'a' shape [None, 3] != [4]"]),
    (_sig([A, B]), _sig([("a", "int8", (None, 3)), ("b", "int32", (2, 6))]),
     ["input 'a' dtype float32 != int8", "input 'b' shape [2, 5] != [2, 6]"]),
    (_sig([A]), _sig([("a", "int8", (None, 3))], [("z", "float32", ())]),
     ["input 'a' dtype float32 != int8", "outputs ['y'] != ['z']"]),
])
def test_io_signature_diff(left: IoSignature, right: IoSignature, diff: list[str]) -> None:
    assert left.diff(right) == diff
    assert io_difference(left.to_wire(), right.to_wire()) == (diff[0] if diff else None)
    assert io_difference(left, right) == (diff[0] if diff else None)


def test_manifest_io_is_the_typed_signature() -> None:
    sig = signature(CATALOG_INFO)
    assert _manifest(io_signature=sig.to_wire()).io() == sig
    assert _manifest().io() is None


# -- GoldenInput ----------------------------------------------------------------------------

X = np.arange(6, dtype=np.float32).reshape(1, 6) / 4
MASK = np.array([[1, -2, 3]], dtype=np.int64)
# catalog.load_golden of {input: X, mask: MASK} before the shared types, canonical JSON
GOLDEN_BYTES = (b'[{"input":{"b64":"AAAAAAAAgD4AAAA/AABAPwAAgD8AAKA/","dtype":"float32","shape":[1,6]},'
                b'"mask":{"b64":"AQAAAAAAAAD+/////////wMAAAAAAAAA","dtype":"int64","shape":[1,3]}}]')


def test_golden_wire_form_is_unchanged(tmp_path) -> None:
    np.savez(tmp_path / "g.npz", input=X, mask=MASK)
    inputs = (TensorSpec("input", "float32", ("N", 6)), TensorSpec("mask", "int64", (1, 3)))
    assert canonical_json(load_golden([tmp_path / "g.npz"], inputs)) == GOLDEN_BYTES
    assert canonical_json([golden_input({"input": X, "mask": MASK}).to_wire()]) == GOLDEN_BYTES


def test_golden_round_trips_to_the_same_arrays() -> None:
    sample = golden_input({"input": X, "mask": MASK})
    again = GoldenInput.from_wire(sample.to_wire())
    assert again == sample and again.nbytes == X.nbytes + MASK.nbytes
    assert again.tensors[1] == GoldenTensor("mask", "int64", (1, 3), MASK.tobytes())
    feeds = golden_feeds(again)
    np.testing.assert_array_equal(feeds["input"], X)
    np.testing.assert_array_equal(feeds["mask"], MASK)
    (decoded,) = decode_golden((sample.to_wire(),))
    assert decoded.keys() == {"input", "mask"} and decoded["mask"].dtype == np.int64


def test_manifest_golden_is_typed() -> None:
    sample = golden_input({"input": X})
    assert _manifest(golden_inputs=(sample.to_wire(),)).golden() == (sample,)


GOOD = {"dtype": "float32", "shape": [1, 2], "b64": "AAAAAAAAgD8="}


@pytest.mark.parametrize("wire, why", [
    ([GOOD], "must map input names"),
    ({"x": [1]}, "must be {dtype, shape, b64}"),
    ({"x": {**GOOD, "b64": None}}, "must be {dtype, shape, b64}"),
    ({"x": {**GOOD, "b64": "not base64!"}}, "not valid base64"),
    ({"x": {**GOOD, "shape": [1, 3]}}, "has 8 bytes, its shape [1, 3] of float32 needs 12"),
    ({"x": {**GOOD, "shape": [-1, -2]}}, "non-negative integers"),
    ({"x": {**GOOD, "shape": [None, 2]}}, "non-negative integers"),
    ({"x": {**GOOD, "dtype": "object"}}, "cannot travel"),
])
def test_golden_from_wire_refuses(wire: Any, why: str) -> None:
    assert GoldenInput.from_wire({"x": GOOD}).tensors[0].shape == (1, 2)
    with pytest.raises(WireError, match=re.escape(why)):
        GoldenInput.from_wire(wire)


def test_undecodable_golden_is_a_value_error_for_the_agent() -> None:
    with pytest.raises(ValueError, match="not valid base64"):
        decode_golden(({"x": {**GOOD, "b64": "@@"}},))


# -- EventState and Event -------------------------------------------------------------------

# Event encodings before EventState and ``version: str | None`` (canonical JSON)
REJECTED_BYTES = (b'{"at":1700000000,"bytes_received":0,"chunks_reused":0,"chunks_total":0,'
                  b'"device_id":"dev-1","event_id":"e1","health":{},"manifest_id":null,'
                  b'"model":"detector","reason":"bad signature","rollout_id":null,"sha256":null,'
                  b'"state":"rejected","type":"event","v":1,"version":"?"}')
HEALTHY_BYTES = (b'{"at":1700000000,"bytes_received":0,"chunks_reused":0,"chunks_total":0,'
                 b'"device_id":"dev-1","event_id":"e2","health":{"p95_us":5},"manifest_id":"m1",'
                 b'"model":"detector","reason":"","rollout_id":7,"sha256":"' + b"a" * 64 + b'",'
                 b'"state":"healthy","type":"event","v":1,"version":"v2"}')


def test_event_states_keep_their_values_and_order() -> None:
    assert [s.value for s in EventState] == ["downloading", "applying", "trial", "healthy",
                                             "rolled_back", "failed", "rejected", "waiting"]
    assert tuple(EventState) == EVENT_STATES and "healthy" in EVENT_STATES


def test_unknown_version_is_none_and_travels_as_a_question_mark() -> None:
    ev = decode(Event, REJECTED_BYTES)
    assert ev.version is None and ev.state is EventState.REJECTED
    assert encode(ev) == REJECTED_BYTES
    built = Event("e1", "dev-1", None, None, "detector", None, EventState.REJECTED,
                  reason="bad signature", at=1_700_000_000)
    assert built == ev and encode(built) == REJECTED_BYTES
    legacy = Event("e1", "dev-1", None, None, "detector", "?", "rejected",
                   reason="bad signature", at=1_700_000_000)
    assert legacy == ev


def test_event_with_a_version_encodes_as_before() -> None:
    ev = Event("e2", "dev-1", "m1", 7, "detector", "v2", "healthy", sha256="a" * 64,
               health={"p95_us": 5}, at=1_700_000_000)
    assert ev.state is EventState.HEALTHY and type(ev.to_wire()["state"]) is str
    assert encode(ev) == HEALTHY_BYTES
    assert decode(Event, HEALTHY_BYTES) == ev


@pytest.mark.parametrize("state", ["done", "HEALTHY", ""])
def test_event_with_an_unknown_state_is_refused(state: str) -> None:
    wire = decode(Event, HEALTHY_BYTES).to_wire()
    with pytest.raises(WireError, match="unknown event state"):
        Event.from_wire({**wire, "state": state})


def test_event_without_a_version_is_still_refused() -> None:
    wire = decode(Event, HEALTHY_BYTES).to_wire()
    del wire["version"]
    with pytest.raises(WireError, match="missing field 'version'"):
        Event.from_wire(wire)


# -- every contract parser refuses with WireError only --------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats(allow_nan=True)
    | st.text(max_size=12) | st.sampled_from(["float32", "int64", "AAAA", "name", "shape"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "dtype", "shape", "b64", "inputs", "outputs", "x",
                         "min_requests", "p95_slack_us"]) | st.text(max_size=4), inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=200, deadline=500)
@given(JSON)
def test_contract_parsers_raise_only_wire_errors(value: Any) -> None:
    for parse in (HealthPolicy.from_wire, IoSignature.from_wire, GoldenInput.from_wire,
                  TensorSpec.from_wire):
        with contextlib.suppress(WireError):
            parse(value)


def _manifest(**fields: Any) -> Manifest:
    m = Manifest("m", "dev-1", 1, 1, 2, None, "det", "v1", "default", "onnx", SHA, 10, None,
                 ArtifactRef("full", "identity", SHA, 10, 65536, (SHA,)), **fields)
    return Manifest.from_wire(m.to_wire())
