"""Delta codecs: every codec round-trips every update kind; the chooser keeps the smallest
verified delta within the budget; the agent decodes within a memory cap and refuses what it
does not know."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltafleet import codecs
from deltafleet.agent.errors import UpdateRejected
from deltafleet.agent.update import apply_artifact
from deltafleet.codecs import tensor_xor
from deltafleet.server import codecs as server_codecs
from deltafleet.server.codecs import (
    Bsdiff4Encoder,
    Budget,
    TensorXorEncoder,
    ZstdDictEncoder,
    build_compressed_full,
    choose,
    compressed_full_size,
    default_encoders,
)
from deltafleet.server.codecs.layout import model_tensors
from deltafleet.server.deltas import DeltaBuilder, NoDelta, build_best_delta
from deltafleet.shared import ArtifactRef, DeltafleetError, Manifest, sha256_bytes
from scripts.bench.delta import KINDS_INT8, make_pair
from tests import factories
from tests.harness import modelgen

SIZE_MB = 0.25
KINDS_FP32 = [k for k in KINDS_INT8 if k != "requant"]
CASES = [("fp32", k) for k in KINDS_FP32] + [("int8", k) for k in KINDS_INT8]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("pairs")
    return {
        (precision, kind): make_pair(kind, root / f"{precision}-{kind}", size_mb=SIZE_MB,
                                     precision=precision)
        for precision, kind in CASES
    }


def manifest_for(target: bytes, artifact: bytes, codec: str) -> Manifest:
    return factories.manifest(
        target=target, expires_at=int(time.time()) + 60, base_sha256="0" * 64,
        artifact=factories.artifact_ref(artifact, kind="delta", codec=codec,
                                        chunks=(sha256_bytes(artifact),)))


@pytest.mark.parametrize("encoder", default_encoders(), ids=lambda e: e.name)
@pytest.mark.parametrize(("precision", "kind"), CASES)
def test_every_codec_round_trips_every_update_kind(pairs, tmp_path, encoder, precision, kind):
    base, target = pairs[(precision, kind)]
    out = tmp_path / "delta"
    encoder.encode(base, target, out)
    restored = codecs.decode(encoder.name, out.read_bytes(), base,
                                   target_size=target.stat().st_size)
    assert restored == target.read_bytes()


def test_model_aware_codec_finds_every_initializer(pairs):
    base, _ = pairs[("fp32", "finetune")]
    with codecs.FileSource(base) as src:
        fmt, tensors = model_tensors(src)  # type: ignore[misc]
    assert fmt == "onnx"
    assert {t.name for t in tensors} >= {f"fc{i}.weight" for i in range(7)}
    assert all(t.itemsize == 4 for t in tensors if t.name.endswith(".weight"))


def test_tflite_models_round_trip_through_the_model_aware_codec(tmp_path):
    base = modelgen.make_tflite_model(tmp_path / "a.tflite", input_dim=64, output_dim=32)
    target = modelgen.make_tflite_model(tmp_path / "b.tflite", input_dim=64, output_dim=32,
                                        retrain=True)
    with codecs.FileSource(base) as src:
        fmt, tensors = model_tensors(src)  # type: ignore[misc]
    assert fmt == "tflite" and any(t.name == "dense/weights" for t in tensors)
    out = tmp_path / "delta"
    TensorXorEncoder().encode(base, target, out)
    assert codecs.decode_sha256("tensor-xor", out, base)[0] == sha256_bytes(
        target.read_bytes())


def test_full_fine_tune_is_much_smaller_than_bsdiff4(pairs, tmp_path):
    base, target = pairs[("fp32", "finetune")]
    tx, bs = tmp_path / "tx", tmp_path / "bs"
    TensorXorEncoder().encode(base, target, tx)
    Bsdiff4Encoder().encode(base, target, bs)
    assert tx.stat().st_size <= 0.7 * bs.stat().st_size


def test_chooser_keeps_the_smallest_verified_delta(pairs, tmp_path):
    base, target = pairs[("fp32", "layer_inserted")]
    choice = choose(base, target, tmp_path)
    sizes = {a.codec: a.size_bytes for a in choice.attempts if a.size_bytes is not None}
    assert set(sizes) == {"tensor-xor", "zstd-dict", "bsdiff4"}
    assert choice.codec == min(sizes, key=lambda c: sizes[c])
    assert choice.path is not None and choice.path.stat().st_size == sizes[choice.codec]
    assert [a.verified for a in choice.attempts if a.codec == choice.codec] == [True]
    assert [p.name for p in tmp_path.iterdir()] == [choice.path.name]  # losers deleted


def test_codec_over_the_memory_budget_is_skipped(pairs, tmp_path):
    base, target = pairs[("fp32", "head_only")]
    budget = Budget(memory_bytes=Bsdiff4Encoder().predicted_peak_bytes(
        base.stat().st_size, target.stat().st_size) - 1)
    choice = choose(base, target, tmp_path, budget=budget)
    bsdiff = next(a for a in choice.attempts if a.codec == "bsdiff4")
    assert bsdiff.size_bytes is None and "budget" in bsdiff.skipped
    assert choice.codec in ("tensor-xor", "zstd-dict")


def test_complete_retrain_is_never_worse_than_the_compressed_full_model(pairs, tmp_path):
    base, target = pairs[("fp32", "complete_retrain")]
    choice = choose(base, target, tmp_path)
    assert choice.size_bytes is None or choice.size_bytes < choice.reference_bytes


def test_no_winner_when_nothing_beats_the_full_model(tmp_path):
    base, target = tmp_path / "a.bin", tmp_path / "b.bin"
    base.write_bytes(hashlib.sha256(b"a").digest() * 2000)
    target.write_bytes(bytes(range(256)) * 4)  # tiny and unrelated: zstd of it wins
    choice = choose(base, target, tmp_path, encoders=[ZstdDictEncoder(), Bsdiff4Encoder()])
    assert choice.codec is None and "compressed full model" in choice.reason
    assert list(tmp_path.glob(".delta.*")) == []


def test_chooser_weighs_deltas_against_the_full_artifact_it_is_given(pairs, tmp_path):
    base, target = pairs[("fp32", "head_only")]
    choice = choose(base, target, tmp_path, reference_bytes=1)
    assert choice.codec is None and choice.reference_bytes == 1
    assert list(tmp_path.glob(".delta.*")) == []


def test_full_model_becomes_one_zstd_frame_the_agent_decodes(tmp_path):
    model = modelgen.make_onnx_model(tmp_path / "m.onnx", size_mb=0.1)
    data = model.read_bytes()
    built = build_compressed_full(model, tmp_path / "out")
    assert built is not None and built.codec == "zstd" and built.level == 19
    packed = built.path.read_bytes()
    assert sha256_bytes(packed) == built.sha256 and len(packed) == built.size_bytes < len(data)
    assert built.size_bytes == compressed_full_size(model)  # one compressor for both
    m = dataclasses.replace(manifest_for(data, packed, "zstd"), base_sha256=None,
                            artifact=ArtifactRef("full", "zstd", built.sha256, len(packed), 65536,
                                                 (built.sha256,)))
    assert apply_artifact(m, packed, None) == data


def test_model_that_zstd_cannot_shrink_has_no_compressed_form(tmp_path):
    noise = modelgen.make_incompressible_onnx_model(tmp_path / "noise.onnx", size_mb=0.1)
    assert build_compressed_full(noise, tmp_path / "out") is None
    assert list((tmp_path / "out").iterdir()) == []  # nothing left behind


def test_compressed_form_that_does_not_round_trip_is_discarded(tmp_path, monkeypatch):
    model = modelgen.make_onnx_model(tmp_path / "m.onnx", size_mb=0.1)
    monkeypatch.setattr(server_codecs, "decode_sha256", lambda *args: ("0" * 64, 1))
    assert build_compressed_full(model, tmp_path / "out") is None
    assert list((tmp_path / "out").iterdir()) == []


def test_delta_builder_returns_one_winner_per_pair(pairs, tmp_path):
    base, target = pairs[("fp32", "head_only")]
    tsha = sha256_bytes(target.read_bytes())
    builder = DeltaBuilder(tmp_path / "work")
    try:
        builder.submit("b" * 64, base, tsha, target)
        deadline = time.monotonic() + 60
        done: list = []
        while not done and time.monotonic() < deadline and not builder.failed:
            done = builder.finished()
            time.sleep(0.05)  # poll pacing: the builder's worker has no completion event
    finally:
        builder.shutdown()
    assert not builder.failed and len(done) == 1
    built = done[0]
    assert built.codec == "tensor-xor" and built.target_sha256 == tsha
    assert built.size_bytes == built.path.stat().st_size < target.stat().st_size // 10


def test_a_pair_no_delta_beats_is_a_no_delta_answer_not_an_error(tmp_path):
    base, target = tmp_path / "base", tmp_path / "target"
    base.write_bytes(os.urandom(64 << 10))
    target.write_bytes(os.urandom(64 << 10))  # unrelated noise: nothing beats the full model
    (tmp_path / "out").mkdir()
    result = build_best_delta(str(base), str(target), sha256_bytes(target.read_bytes()),
                              str(tmp_path / "out"))
    assert isinstance(result, NoDelta) and result.reason
    assert list((tmp_path / "out").iterdir()) == []


def test_codec_names_and_errors_import_without_numpy_or_zstd() -> None:
    code = ("import sys; from deltafleet.codecs import IDENTITY, CodecError; "
            "import deltafleet.server.planner; "
            "print(IDENTITY, 'numpy' in sys.modules, 'zstandard' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out == ["identity", "False", "False"]


def test_codec_errors_are_project_errors_not_value_errors() -> None:
    for cls in (codecs.CodecError, codecs.UnknownCodec, codecs.MemoryCapExceeded,
                codecs.TargetMismatch):
        assert issubclass(cls, DeltafleetError) and not issubclass(cls, ValueError)
    with pytest.raises(codecs.UnknownCodec):
        codecs.decode("lzma", b"", None, target_size=0)


def test_agent_applies_a_model_aware_delta(pairs, tmp_path):
    base, target = pairs[("int8", "requant")]
    out = tmp_path / "delta"
    TensorXorEncoder().encode(base, target, out)
    data = target.read_bytes()
    artifact = out.read_bytes()
    assert apply_artifact(manifest_for(data, artifact, "tensor-xor"), artifact, base) == data


def test_unknown_codec_is_refused_by_the_agent(pairs):
    base, target = pairs[("fp32", "head_only")]
    m = manifest_for(target.read_bytes(), b"whatever", "xdelta9")
    with pytest.raises(UpdateRejected, match="unknown codec 'xdelta9'"):
        apply_artifact(m, b"whatever", base)


def test_agent_refuses_a_decode_over_its_memory_cap(pairs, tmp_path):
    base, target = pairs[("fp32", "head_only")]
    out = tmp_path / "delta"
    Bsdiff4Encoder().encode(base, target, out)
    artifact = out.read_bytes()
    m = manifest_for(target.read_bytes(), artifact, "bsdiff4")
    with pytest.raises(UpdateRejected, match="cap"):
        apply_artifact(m, artifact, base, max_memory_bytes=64 << 20)


def test_corrupt_model_aware_delta_is_refused(pairs, tmp_path):
    base, target = pairs[("fp32", "finetune")]
    out = tmp_path / "delta"
    TensorXorEncoder().encode(base, target, out)
    artifact = bytearray(out.read_bytes())
    artifact[len(artifact) // 2] ^= 0xFF
    m = manifest_for(target.read_bytes(), bytes(artifact), "tensor-xor")
    with pytest.raises(UpdateRejected):
        apply_artifact(m, bytes(artifact), base)


def test_model_aware_delta_for_another_base_is_refused(pairs, tmp_path):
    base, target = pairs[("fp32", "finetune")]
    _, other = pairs[("fp32", "complete_retrain")]
    out = tmp_path / "delta"
    TensorXorEncoder().encode(base, target, out)
    m = manifest_for(target.read_bytes(), out.read_bytes(), "tensor-xor")
    with pytest.raises(UpdateRejected):
        apply_artifact(m, out.read_bytes(), other)


def test_budget_is_a_frozen_config():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Budget().memory_bytes = 1  # type: ignore[misc]


def test_tensor_xor_header_packs_offsets_as_gaps_and_round_trips() -> None:
    header = {"target_size": 100, "base_size": 90, "chunk_bytes": 16,
              "base_ranges": [[10, 20], [40, 30]], "skeleton": [0, 5, 40],
              "segments": [[12, 20, "copy", 1, 10, []], [35, 8, "zsub", 4, 44, [3, 3, 3, 3]],
                           [50, 8, "raw", 4, 0, [1, 1, 1, 1]]]}
    packed = codecs.pack_tx_header(header)
    assert packed["base_ranges"] == [[10, 20], [10, 30]]
    assert packed["segments"][1][:6] == [3, 8, "zsub", 4, 1, 4]
    assert codecs.unpack_tx_header(packed) == header


@pytest.mark.parametrize("bad", [
    {"base_ranges": [[-1, 20]]},
    {"segments": [[0, 40, "copy", 1, 0, 0, []]]},  # runs past its base range (20 bytes)
    {"segments": [[0, 4, "xor", 4, 5, 0, [1, 1, 1, 1]]]},  # no such range
    {"segments": [[-3, 4, "copy", 1, 0, 0, []]]},
])
def test_malformed_tensor_xor_headers_are_refused(bad) -> None:
    packed = {"target_size": 100, "base_size": 90, "chunk_bytes": 16,
              "base_ranges": [[10, 20]], "skeleton": [0, 5, 40], "segments": []}
    with pytest.raises(ValueError):
        codecs.unpack_tx_header({**packed, **bad})


def test_an_unchanged_tensor_is_one_copy_segment_however_large(pairs, tmp_path) -> None:
    base, target = pairs[("fp32", "graph_only")]
    out = tmp_path / "delta"
    TensorXorEncoder().encode(base, target, out)
    with codecs.FileSource(out) as src:
        header, _ = tensor_xor.read_tx_header(src)
    assert all(seg[2] == "copy" for seg in header["segments"])
    assert len(header["segments"]) == len(header["base_ranges"])
    assert codecs.decode("tensor-xor", out.read_bytes(), base,
                               target_size=target.stat().st_size) == target.read_bytes()
