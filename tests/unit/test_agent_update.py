"""The agent's update checks, in the order it makes them, without a broker."""

from __future__ import annotations

import time
from pathlib import Path

import bsdiff4
import pytest

from deltafleet.agent.errors import UpdateRejected
from deltafleet.agent.store import InstalledModel, LocalStore
from deltafleet.agent.update import ChunkSet, apply_artifact, check_base, verify_manifest
from deltafleet.shared import Manifest, SigningKey, sha256_bytes
from tests.factories import artifact_ref, manifest

CHUNK = 1024


def make(base: bytes, target: bytes, *, kind: str = "delta", **overrides) -> tuple[Manifest, bytes]:
    artifact = bsdiff4.diff(base, target) if kind == "delta" else target
    ref = artifact_ref(artifact, kind=kind, codec="bsdiff4" if kind == "delta" else "identity",
                       chunk_bytes=CHUNK)
    fields = dict(artifact=ref, expires_at=int(time.time()) + 60, base_sha256=sha256_bytes(base))
    return manifest(target=target, **{**fields, **overrides}), artifact


BASE = bytes(range(256)) * 40
TARGET = BASE[:5000] + b"retrained-head" * 20 + BASE[5280:]


def test_manifest_for_another_device_is_rejected():
    key = SigningKey.generate()
    m, _ = make(BASE, TARGET, device_id="dev-2")
    with pytest.raises(UpdateRejected, match="dev-2"):
        verify_manifest(key.sign_bytes(m.to_wire()), [key.public_key], device_id="dev-1")


def test_expired_manifest_is_rejected():
    key = SigningKey.generate()
    m, _ = make(BASE, TARGET, expires_at=1)
    with pytest.raises(UpdateRejected, match="expired"):
        verify_manifest(key.sign_bytes(m.to_wire()), [key.public_key], device_id="dev-1")


def test_manifest_from_untrusted_key_is_rejected():
    m, _ = make(BASE, TARGET)
    with pytest.raises(UpdateRejected, match="signature"):
        verify_manifest(SigningKey.generate().sign_bytes(m.to_wire()),
                        [SigningKey.generate().public_key], device_id="dev-1")


def test_delta_for_a_base_the_device_does_not_run_is_rejected():
    m, _ = make(BASE, TARGET)
    other = InstalledModel("m", "v0", sha256_bytes(b"other"), "default", "onnx")
    with pytest.raises(UpdateRejected, match="base mismatch"):
        check_base(m, other)


def test_tampered_chunk_is_refused_and_stays_missing(tmp_path: Path):
    m, artifact = make(BASE, TARGET, kind="full")
    chunks = ChunkSet(m, tmp_path / "dl")
    assert not chunks.accept(0, b"x" * CHUNK)
    assert chunks.rejected == 1 and 0 in chunks.missing()
    assert chunks.accept(0, artifact[:CHUNK])
    assert 0 not in chunks.missing()


def test_download_resumes_from_verified_chunks_on_disk(tmp_path: Path):
    m, artifact = make(BASE, TARGET, kind="full")
    first = ChunkSet(m, tmp_path / "dl")
    for i in range(3):
        first.accept(i, artifact[i * CHUNK:(i + 1) * CHUNK])
    (tmp_path / "dl" / "3").write_bytes(b"corrupt")  # a bad file on disk is dropped
    again = ChunkSet(m, tmp_path / "dl")
    assert again.reused == 3
    assert again.missing() == list(range(3, again.total))


def test_delta_applies_to_the_exact_target(tmp_path: Path):
    m, artifact = make(BASE, TARGET)
    base = tmp_path / "base"
    base.write_bytes(BASE)
    assert apply_artifact(m, artifact, base) == TARGET


def test_patch_producing_another_target_is_rejected(tmp_path: Path):
    m, artifact = make(BASE, TARGET, target_sha256=sha256_bytes(b"something else"))
    base = tmp_path / "base"
    base.write_bytes(BASE)
    with pytest.raises(UpdateRejected, match="target hash mismatch"):
        apply_artifact(m, artifact, base)


def test_activation_keeps_the_previous_model(tmp_path: Path):
    store = LocalStore(tmp_path)
    v1 = InstalledModel("m", "v1", sha256_bytes(b"1"), "default", "onnx", serial=1)
    v2 = InstalledModel("m", "v2", sha256_bytes(b"2"), "default", "onnx", serial=2)
    store.stage(v1.sha256, "onnx", b"1")
    store.activate(v1)
    store.stage(v2.sha256, "onnx", b"2")
    store.activate(v2)
    reopened = LocalStore(tmp_path)
    assert reopened.current("m") == v2 and reopened.previous("m") == v1
    assert reopened.model_path(v1.sha256, "onnx").exists()
    assert reopened.last_serial_of("m") == 2
