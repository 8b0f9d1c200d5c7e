"""The agent's streaming decoders: bspatch reproduces bsdiff4's own ``patch`` byte for byte,
full models ship zstd-compressed, zigzag round-trips, and applying to a file leaves either the
verified target or nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path

import bsdiff4
import numpy as np
import pytest
import zstandard as zstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltafleet import codecs
from deltafleet.agent._bspatch_worker import stream_patch
from deltafleet.agent.errors import UpdateRejected
from deltafleet.agent.update import ChunkSet, apply_to_file
from deltafleet.shared import ArtifactRef, Manifest, chunk_hashes_file, sha256_bytes
from tests import factories


def _patched(patch: bytes, base: bytes) -> bytes:
    out: list[bytes] = []
    stream_patch(codecs.BytesSource(patch), codecs.BytesSource(base), out.append)
    return b"".join(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.binary(max_size=4096), edits=st.lists(
    st.tuples(st.integers(0, 4096), st.integers(0, 64), st.binary(max_size=64)), max_size=8))
def test_stream_patch_matches_bsdiff4(base: bytes, edits: list[tuple[int, int, bytes]]) -> None:
    target = bytearray(base)
    for pos, cut, insert in edits:
        pos = min(pos, len(target))
        target[pos:pos + cut] = insert
    patch = bsdiff4.diff(base, bytes(target))
    assert _patched(patch, base) == bsdiff4.patch(base, patch) == bytes(target)


def test_stream_patch_on_a_model_sized_input_crosses_piece_boundaries() -> None:
    rng = np.random.default_rng(1)
    base = rng.standard_normal(700_000).astype(np.float32).tobytes()  # 2.8 MB: > 1 MiB pieces
    target = bytearray(base)
    target[100:200] = b"x" * 100
    target[1_500_000:1_500_000] = b"inserted" * 1000
    noisy = np.frombuffer(bytes(target[2_000_000:2_400_000]), dtype=np.uint8).copy()
    noisy[::7] += 1
    target[2_000_000:2_400_000] = noisy.tobytes()
    patch = bsdiff4.diff(base, bytes(target))
    assert _patched(patch, base) == bytes(target)


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_zigzag_round_trips_every_difference(width: int) -> None:
    dtype = codecs.UINT_DTYPES[width]
    rng = np.random.default_rng(width)
    a = rng.integers(0, np.iinfo(dtype).max, 5000, dtype=dtype, endpoint=True)
    b = rng.integers(0, np.iinfo(dtype).max, 5000, dtype=dtype, endpoint=True)
    diff = np.subtract(a, b)
    z = codecs.zigzag(diff)
    small = np.array([0, 1, np.iinfo(dtype).max], dtype=dtype)  # 0, +1, -1
    assert codecs.zigzag(small).tolist() == [0, 2, 1]
    assert np.array_equal(codecs.unzigzag(z.copy()), diff)


def _manifest(target: bytes, artifact: bytes, codec: str, kind: str = "delta") -> Manifest:
    return factories.manifest(
        target=target, expires_at=int(time.time()) + 60,
        base_sha256=None if kind == "full" else "0" * 64,
        artifact=factories.artifact_ref(artifact, kind=kind, codec=codec,
                                        chunks=(sha256_bytes(artifact),)))


def test_full_model_ships_zstd_compressed_and_streams_to_disk(tmp_path: Path) -> None:
    target = np.random.default_rng(2).standard_normal(300_000).astype(np.float16).tobytes() * 2
    artifact = zstd.ZstdCompressor(level=19).compress(target)
    assert len(artifact) < len(target)
    dest = tmp_path / "models" / "t.onnx"
    apply_to_file(_manifest(target, artifact, "zstd", "full"), codecs.BytesSource(artifact),
                  None, dest)
    assert dest.read_bytes() == target
    assert [p.name for p in dest.parent.iterdir()] == ["t.onnx"]


@pytest.mark.parametrize("codec", ["zstd", "bsdiff4", "zstd-dict"])
def test_a_wrong_result_leaves_nothing_on_disk(tmp_path: Path, codec: str) -> None:
    base_path = tmp_path / "base"
    base = os.urandom(50_000)
    base_path.write_bytes(base)
    target = base[:25_000] + b"changed" + base[25_007:]
    other = base[:25_000] + b"CHANGED" + base[25_007:]  # same size, another sha256
    if codec == "zstd":
        artifact = zstd.ZstdCompressor().compress(other)
    elif codec == "bsdiff4":
        artifact = bsdiff4.diff(base, other)
    else:
        d = zstd.ZstdCompressionDict(base, dict_type=zstd.DICT_TYPE_RAWCONTENT)
        artifact = zstd.ZstdCompressor(dict_data=d).compress(other)
    dest = tmp_path / "models" / "t.onnx"
    with pytest.raises(UpdateRejected, match="target hash mismatch"):
        apply_to_file(_manifest(target, artifact, codec, "full" if codec == "zstd" else "delta"),
                      codecs.BytesSource(artifact), base_path, dest)
    assert list(dest.parent.iterdir()) == []


def test_chunk_source_reads_the_artifact_in_place(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    art_file = tmp_path / "artifact"
    art_file.write_bytes(data)
    m = _manifest(data, data, "identity", "full")
    chunks = tuple(chunk_hashes_file(art_file, 65536))
    m = dataclasses.replace(m, artifact=ArtifactRef(
        "full", "identity", hashlib.sha256(data).hexdigest(), len(data), 65536, chunks))
    cs = ChunkSet(m, tmp_path / "dl")
    for i in range(len(chunks)):
        assert cs.accept(i, data[i * 65536:(i + 1) * 65536])
    src = cs.source()
    assert src.size == len(data)
    assert src.read_at(65000, 2000) == data[65000:67000]
    assert src.read_at(0, len(data)) == data
    (tmp_path / "dl" / "2").write_bytes(b"tampered")
    with pytest.raises(UpdateRejected, match="hash mismatch"):
        cs.source()
