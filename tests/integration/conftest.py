"""Fixtures shared by the integration tests that drive a real agent with a test-side signer."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltafleet.shared import SigningKey

from .mqtt_peer import Peer


@pytest.fixture
def key(tmp_path: Path) -> tuple[SigningKey, Path]:
    """A fresh online signing key and the public key file agents are told to trust."""
    k = SigningKey.generate()
    k.save(tmp_path / "signing.key", tmp_path / "signing.pub")
    return k, tmp_path / "signing.pub"


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    """A 1 MB ONNX v1/v2 pair (a fine-tune: the same graph, changed weights)."""
    from modelgen import make_onnx_pair

    return make_onnx_pair(tmp_path / "models", size_mb=1.0)


@pytest.fixture
def lab(tmp_path: Path, broker):
    """Agent processes on the session's broker (a module may define its own)."""
    from fleetlab import Lab

    lab = Lab(tmp_path / "lab", mqtt_url=broker.url)
    yield lab
    lab.close()


@pytest.fixture
def peer(broker, key):
    """The test-side server: signs manifests with ``key``, serves chunks, records events."""
    p = Peer(broker.url, key[0])
    yield p
    p.close()
