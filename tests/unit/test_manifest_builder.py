"""The manifest the server signs, pinned byte for byte: the canonical JSON of a manifest built
from a rollout policy (the default one, an operator's, and either read back from its stored
row) is exactly what the server signed before the policy's trial limits were typed, and the
stored form of a policy is unchanged."""

from __future__ import annotations

from typing import Any

import pytest

from deltafleet.server.delivery.manifests import build_manifest
from deltafleet.server.errors import UsageError
from deltafleet.server.planner import VariantOption
from deltafleet.server.policy import HEALTH_OPTION_DEFAULTS, RolloutPolicy, health_from_options
from deltafleet.shared import ROLLOUT_HEALTH, ArtifactRef, HealthPolicy, canonical_json

SHA_T = "ab" * 32
SHA_A = "cd" * 32

_HEAD = (b'{"artifact":{"chunk_size_bytes":65536,"chunks":["' + SHA_A.encode() + b'"],'
         b'"codec":"zstd","kind":"full","sha256":"' + SHA_A.encode() + b'","size_bytes":80},'
         b'"base_sha256":null,"device_id":"dev-1","expires_at":1700000600,"format":"onnx",')
_TAIL = (b'"issued_at":1700000000,"manifest_id":"m1","model":"det","rollout_id":7,"serial":3,'
         b'"target_sha256":"' + SHA_T.encode() + b'","target_size_bytes":100,')

DEFAULT_BYTES = (_HEAD + b'"health_policy":{"max_error_rate_ppm":10000,"max_p95_ratio_pct":150,'
                 b'"min_requests":50,"p95_slack_us":1000},' + _TAIL
                 + b'"trial_window_s":60,"type":"manifest","v":1,"variant":"default",'
                 b'"version":"v2"}')
OPERATOR_BYTES = (_HEAD + b'"health_policy":{"max_error_rate_ppm":5000,"max_p95_ratio_pct":0,'
                  b'"min_requests":50,"p95_slack_us":-2500},' + _TAIL
                  + b'"trial_window_s":5,"type":"manifest","v":1,"variant":"default",'
                  b'"version":"v2"}')

_STORED_COMMON: dict[str, Any] = {
    "canary": None, "waves": [100.0], "max_failure_pct": 5.0, "on_failure": "pause",
    "max_concurrent": None, "max_attempts": 3, "retry_backoff_s": 30, "state_timeout_s": 600,
    "bandwidth_bytes_per_s": None, "allow_io_change": False}
DEFAULT_STORED = {**_STORED_COMMON, "health_window_s": 60, "health": {
    "max_error_rate_ppm": 10000, "max_p95_ratio_pct": 150, "min_requests": 50,
    "p95_slack_us": 1000}}
OPERATOR_STORED = {**_STORED_COMMON, "health_window_s": 5, "health": {
    "max_error_rate_ppm": 5000, "max_p95_ratio_pct": 0, "min_requests": 50,
    "p95_slack_us": -2500}}


def _operator_policy() -> RolloutPolicy:
    return RolloutPolicy.from_options(max_error_rate="0.5%", max_p95_ratio="off",
                                      p95_slack_ms=-2.5, health_window="5s")


def _manifest_bytes(policy: RolloutPolicy) -> bytes:
    option = VariantOption(variant_id=1, name="default", format="onnx", precision="fp32",
                           sha256=SHA_T, size_bytes=100)
    artifact = ArtifactRef("full", "zstd", SHA_A, 80, 65536, (SHA_A,))
    m = build_manifest(device_id="dev-1", hardware_id=None, serial=3, rollout_id=7,
                       model="det", version="v2", option=option, artifact=artifact,
                       base_sha256=None, policy=policy, ttl_s=600, issued_at=1_700_000_000,
                       manifest_id="m1")
    return canonical_json(m.to_wire())


@pytest.mark.parametrize("make, stored, signed", [
    (RolloutPolicy, DEFAULT_STORED, DEFAULT_BYTES),
    (_operator_policy, OPERATOR_STORED, OPERATOR_BYTES),
])
def test_signed_manifest_bytes_and_stored_policy_are_unchanged(make: Any, stored: dict[str, Any],
                                                               signed: bytes) -> None:
    policy = make()
    assert policy.to_json() == stored
    assert list(policy.to_json()["health"]) == list(stored["health"])
    assert _manifest_bytes(policy) == signed
    again = RolloutPolicy.from_json(stored)
    assert again == policy
    assert _manifest_bytes(again) == signed


def test_the_rollout_default_is_rollout_health_and_the_cli_defaults_say_the_same() -> None:
    assert RolloutPolicy().health == ROLLOUT_HEALTH
    assert isinstance(RolloutPolicy.from_json(DEFAULT_STORED).health, HealthPolicy)
    assert health_from_options(**HEALTH_OPTION_DEFAULTS) == ROLLOUT_HEALTH
    assert HEALTH_OPTION_DEFAULTS == {"max_error_rate": "1%", "max_p95_ratio": "150%",
                                      "p95_slack_ms": 1.0, "min_requests": 50}


def test_a_stored_policy_without_health_takes_the_rollout_default() -> None:
    row = {k: v for k, v in DEFAULT_STORED.items() if k != "health"}
    assert RolloutPolicy.from_json(row).health == ROLLOUT_HEALTH


def test_health_from_options_refuses_fewer_than_one_request() -> None:
    with pytest.raises(UsageError, match="at least 1"):
        health_from_options(max_error_rate="1%", max_p95_ratio="150%", p95_slack_ms=1.0,
                            min_requests=0)
