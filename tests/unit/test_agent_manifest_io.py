"""Optional manifest fields for the IO contract and golden inputs, and the agent's config keys
for the local API, fallback models and swap mode."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from deltafleet.agent.config import load_config
from deltafleet.agent.errors import ConfigError
from deltafleet.agent.serving import decode_golden
from deltafleet.shared import Manifest, WireError, sha256_bytes
from tests import factories

SIG = {"inputs": [{"name": "input", "dtype": "float32", "shape": [None, 64]}],
       "outputs": [{"name": "output", "dtype": "float32", "shape": [None, 10]}]}


def manifest(**fields) -> Manifest:
    data = b"model"
    return factories.manifest(
        target=data, expires_at=10, rollout_id=None, model="det", version="v1",
        artifact=factories.artifact_ref(data, chunk_bytes=1024, chunks=(sha256_bytes(data),)),
        **fields)


def golden_item(x: np.ndarray) -> dict:
    return {"input": {"dtype": x.dtype.name, "shape": list(x.shape),
                      "b64": base64.b64encode(x.tobytes()).decode()}}


def test_io_signature_and_golden_inputs_round_trip():
    x = np.arange(64, dtype=np.float32).reshape(1, 64)
    m = manifest(io_signature=SIG, allow_io_change=True, golden_inputs=(golden_item(x),))
    again = Manifest.from_wire(m.to_wire())
    assert again == m
    (feeds,) = decode_golden(again.golden_inputs)
    np.testing.assert_array_equal(feeds["input"], x)


def test_manifest_without_the_optional_fields_is_unchanged_on_the_wire():
    wire = manifest().to_wire()
    assert not {"io_signature", "allow_io_change", "golden_inputs"} & set(wire)
    m = Manifest.from_wire(wire)
    assert (m.io_signature, m.allow_io_change, m.golden_inputs) == (None, False, ())


@pytest.mark.parametrize("bad", [
    {"io_signature": {"inputs": "x", "outputs": []}},
    {"io_signature": {"inputs": [{"name": "a", "dtype": "float32", "shape": ["N"]}], "outputs": []}},
    {"golden_inputs": [{"input": {"dtype": "float32", "shape": [1]}}]},
    {"allow_io_change": "yes"},
])
def test_malformed_optional_fields_are_wire_errors(bad):
    wire = manifest().to_wire()
    wire.update(bad)
    with pytest.raises(WireError):
        Manifest.from_wire(wire)


def test_api_port_fallbacks_and_swap_mode_come_from_the_environment(tmp_path: Path, monkeypatch):
    key = tmp_path / "k.pub"
    key.write_text("x")
    tiny = tmp_path / "tiny.onnx"
    tiny.write_bytes(b"x")
    monkeypatch.setenv("FLEET_AGENT_API_PORT", "0")
    monkeypatch.setenv("FLEET_AGENT_FALLBACK", f"det={tiny}")
    monkeypatch.setenv("FLEET_AGENT_SWAP_MODE", "cold")
    cfg = load_config(None, device_id="d1", trusted_keys=[key])
    assert (cfg.api_port, cfg.fallback_models, cfg.swap_mode) == (0, {"det": str(tiny)}, "cold")
    monkeypatch.setenv("FLEET_AGENT_SWAP_MODE", "lukewarm")
    with pytest.raises(ConfigError, match="swap_mode"):
        load_config(None, device_id="d1", trusted_keys=[key])
