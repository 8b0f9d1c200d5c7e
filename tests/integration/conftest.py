"""Fixtures shared by the integration tests that drive a real agent with a test-side signer."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltafleet.shared import SigningKey


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
