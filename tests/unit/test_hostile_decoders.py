"""Hostile artifacts against every decoder but bsdiff4's (see test_agent_hostile.py for those):
each lie in a tensor-xor header (v1 and v2), a zstd or zstd-dict frame is refused with a reason
that names it, before anything of its size is allocated, inside the contained child, which is
killed at its time limit; nothing is left on disk; a refusal recorded by the store is final."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import zstandard as zstd

from deltafleet import codecs
from deltafleet.agent import confined
from deltafleet.agent.errors import ArtifactRefused, DecodeLimitHit, UpdateRejected
from deltafleet.agent.store import LocalStore
from deltafleet.agent.update import apply_to_file
from deltafleet.shared import Manifest, sha256_bytes
from tests import factories

BASE = bytes(range(256)) * 40  # 10,240 bytes: a 5,000-byte "tensor", then the "graph"
TENSOR = 5000
TARGET = BASE[:TENSOR] + b"retrained-graph" * 20 + BASE[TENSOR + 300:]
CAP = 256 << 20


def manifest(artifact: bytes, codec: str, *, target: bytes = TARGET,
             target_size: int | None = None) -> Manifest:
    return factories.manifest(
        target=target, manifest_id="m-1",
        target_size_bytes=len(target) if target_size is None else target_size,
        base_sha256=None if codec == "zstd" else "0" * 64,
        artifact=factories.artifact_ref(artifact, kind="full" if codec == "zstd" else "delta",
                                        codec=codec, chunks=(sha256_bytes(artifact),)))


def apply(tmp_path: Path, artifact: bytes, codec: str, **kw) -> Path:
    """Decode through the agent's path (the contained child); the models dir must stay empty
    on failure."""
    base = tmp_path / "base.onnx"
    base.write_bytes(BASE)
    dest = tmp_path / "models" / "target.onnx"
    m = manifest(artifact, codec, **{k: kw.pop(k) for k in ("target", "target_size") if k in kw})
    try:
        return apply_to_file(m, codecs.BytesSource(artifact), base, dest,
                             max_memory_bytes=kw.pop("max_memory_bytes", CAP), **kw)
    except UpdateRejected:
        assert list(dest.parent.iterdir()) == []  # no partial file, no temp, no spool
        raise


# -- tensor-xor -------------------------------------------------------------------------------
def skeleton_frame(raw: bytes) -> bytes:
    d = zstd.ZstdCompressionDict(BASE[TENSOR:], dict_type=zstd.DICT_TYPE_RAWCONTENT)
    return zstd.ZstdCompressor(dict_data=d).compress(raw)


def good_header(version: int) -> tuple[dict, bytes]:
    """A genuine delta BASE -> TARGET: the tensor copied, the graph from the skeleton."""
    frame = skeleton_frame(TARGET[TENSOR:])
    header = {"target_size": len(TARGET), "base_size": len(BASE),
              "chunk_bytes": codecs.TX_CHUNK_BYTES, "base_ranges": [[0, TENSOR]],
              "skeleton": [0, len(frame), len(TARGET) - TENSOR],
              "segments": [[0, TENSOR, "copy", 1, 0, []]]}
    return (codecs.pack_tx_header(header) if version == 2 else header), frame


def tx(header: dict, payload: bytes, version: int = 2, *, raw_json: bytes | None = None) -> bytes:
    packed = zstd.ZstdCompressor(level=19).compress(
        raw_json if raw_json is not None else json.dumps(header).encode())
    return codecs.TX_PREFIX.pack(codecs.TX_MAGIC, version, len(packed)) + packed + payload


def lie(version: int, **fields) -> bytes:
    header, frame = good_header(version)
    header.update(fields)
    return tx(header, frame, version)


@pytest.mark.parametrize("version", [1, 2])
def test_a_genuine_tensor_xor_delta_decodes_in_the_child(tmp_path: Path, version: int) -> None:
    header, frame = good_header(version)
    assert apply(tmp_path, tx(header, frame, version), "tensor-xor").read_bytes() == TARGET


@pytest.mark.parametrize("version", [1, 2])
def test_lying_chunk_bytes_is_refused_before_any_chunk_is_allocated(tmp_path: Path,
                                                                    version: int) -> None:
    big = 1 << 40  # a 1 TiB "chunk" of raw elements, one plane frame of 20 bytes
    header, frame = good_header(version)
    header["chunk_bytes"] = big
    with pytest.raises(ArtifactRefused, match=r"chunk_bytes 1099511627776 is outside 1\.\.4194304"):
        apply(tmp_path, tx(header, frame, version), "tensor-xor")


@pytest.mark.parametrize("version", [1, 2])
def test_huge_skeleton_length_is_refused(tmp_path: Path, version: int) -> None:
    header, frame = good_header(version)
    header["skeleton"] = [0, len(frame), 3 << 30]  # 3 GiB of graph for a 10 KB target
    with pytest.raises(ArtifactRefused, match="do not fill the 10240-byte target"):
        apply(tmp_path, tx(header, frame, version), "tensor-xor")


def test_huge_skeleton_of_a_huge_signed_target_is_refused_at_the_memory_cap(tmp_path) -> None:
    # a signed manifest that claims a 3 GiB target whose graph is 3 GiB: consistent, so only
    # the memory figure refuses it, before the skeleton is decompressed
    size = 3 << 30
    header, frame = good_header(2)
    header.update(target_size=size, skeleton=[0, len(frame), size - TENSOR])
    with pytest.raises(DecodeLimitHit, match="over the 256 MiB cap"):
        apply(tmp_path, tx(header, frame), "tensor-xor", target_size=size)


def test_skeleton_frame_that_declares_more_than_the_header_is_never_decompressed(tmp_path) -> None:
    header, _ = good_header(2)
    bomb = zstd.ZstdCompressor(level=1).compress(bytes(256 << 20))  # declares 256 MiB
    header["skeleton"] = [0, len(bomb), len(TARGET) - TENSOR]
    with pytest.raises(ArtifactRefused, match="payload frame declares 268435456 bytes"):
        apply(tmp_path, tx(header, bomb), "tensor-xor")


def test_header_json_bomb_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    # the 21 KB header that ran for minutes: millions of segments behind one zstd frame
    segments = ",".join(["[0,0,\"copy\",1,0,0,[]]"] * 2_000_000)
    raw = b'{"segments":[' + segments.encode() + b"]}"
    artifact = tx({}, b"", raw_json=raw)
    assert len(artifact) < 64 << 10 and len(raw) > 40 << 20
    started = time.monotonic()
    with pytest.raises(ArtifactRefused, match=r"header declares 44000014 bytes, over its \d+-byte"):
        apply(tmp_path, artifact, "tensor-xor")
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("version", [1, 2])
def test_more_segments_than_target_bytes_are_refused(tmp_path: Path, version: int) -> None:
    header, frame = good_header(version)
    seg = [0, 1, "copy", 1, 0, 0, []] if version == 2 else [0, 1, "copy", 1, 0, []]
    header["segments"] = [seg] * (len(TARGET) + 1)
    with pytest.raises(ArtifactRefused, match="10241 segments for a 10240-byte target"):
        apply(tmp_path, tx(header, frame, version), "tensor-xor")


V1_LIES = [
    ({"segments": [[0, len(TARGET) + 1, "copy", 1, 0, []]]}, "runs past the target"),
    ({"segments": [[0, TENSOR, "copy", 1, len(BASE), []]]}, "past the base"),
    ({"segments": [[0, 8, "xor", 4, 0, [1 << 40, 1, 1, 1]]]}, "planes run past the end"),
    ({"segments": [[0, 8, "xor", 4, 0, [1, 1]]]}, "planes do not match its itemsize"),
    ({"segments": [[0, 6, "xor", 4, 0, [1, 1, 1, 1]]]}, "breaks chunk_bytes"),
    ({"segments": [[0, 8, "xor", 3, 0, [1, 1, 1]]]}, "itemsize 3 is unknown"),
    ({"segments": [[0, 8, "exec", 1, 0, [1]]]}, "op 'exec'"),
    ({"segments": [[-8, 8, "copy", 1, 0, []]]}, "overlaps"),
    ({"segments": [[0, 8, "copy", 1, 0, []], [4, 8, "copy", 1, 0, []]]}, "overlaps"),
    ({"segments": [[0, 8.5, "copy", 1, 0, []]]}, "not an integer"),
    ({"segments": [[0, True, "copy", 1, 0, []]]}, "not an integer"),
    ({"segments": [[0, 8, "copy", 1, 0, [5]]]}, "copy segment has payload"),
    ({"skeleton": [1 << 40, 10, 10]}, "skeleton frame runs past the end"),
    ({"skeleton": [0, -1, 10]}, "skeleton is not"),
    ({"base_ranges": [[0, len(BASE) + 1]]}, "run past the base"),
    ({"base_ranges": [[100, 10], [0, 10]]}, "unsorted"),
    ({"base_size": 99}, "different base"),
    ({"target_size": -1}, "target_size is not a size"),
    ({"target_size": len(TARGET) + 1}, "is not the signed 10240"),
    ({"chunk_bytes": 0}, "chunk_bytes 0"),
]


@pytest.mark.parametrize(("fields", "reason"), V1_LIES, ids=[r for _, r in V1_LIES])
def test_v1_header_lies_are_refused(tmp_path: Path, fields: dict, reason: str) -> None:
    with pytest.raises(ArtifactRefused, match=reason):
        apply(tmp_path, lie(1, **fields), "tensor-xor")


@pytest.mark.parametrize(("fields", "reason"), [
    ({"segments": [[0, 8, "xor", 4, 0, 0, [1 << 40, 1, 1, 1]]]}, "planes run past the end"),
    ({"segments": [[len(TARGET), 8, "copy", 1, 0, 0, []]]}, "runs past the target"),
    ({"segments": [[0, 8, "copy", 1, 7, 0, []]]}, "malformed segment"),
    ({"base_ranges": [[0, 1 << 50]]}, "run past the base"),
    ({"skeleton": "everything"}, "skeleton is not"),
    ({"segments": {"a": 1}}, "corrupt"),
])
def test_v2_header_lies_are_refused(tmp_path: Path, fields: dict, reason: str) -> None:
    with pytest.raises(ArtifactRefused, match=reason):
        apply(tmp_path, lie(2, **fields), "tensor-xor")


def test_deeply_nested_header_is_refused_in_one_line(tmp_path: Path) -> None:
    raw = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(ArtifactRefused, match="header is corrupt") as e:
        apply(tmp_path, tx({}, b"", raw_json=raw), "tensor-xor")
    assert "\n" not in str(e.value)


def test_truncated_tensor_xor_delta_is_refused(tmp_path: Path) -> None:
    header, frame = good_header(2)
    whole = tx(header, frame)
    for cut in (3, 12, len(whole) - len(frame) - 5, len(whole) - 5):
        with pytest.raises(ArtifactRefused):
            apply(tmp_path, whole[:cut], "tensor-xor")


def test_plane_frame_that_declares_another_length_is_refused(tmp_path: Path) -> None:
    plane = zstd.ZstdCompressor().compress(bytes(64 << 20))
    header, _ = good_header(1)
    frame = skeleton_frame(TARGET[8:])
    header["segments"] = [[0, 8, "raw", 1, 0, [len(plane)]]]
    header["skeleton"] = [0, len(frame), len(TARGET) - 8]
    with pytest.raises(ArtifactRefused, match="payload frame declares 67108864 bytes"):
        apply(tmp_path, tx(header, frame + plane, 1), "tensor-xor")


def long_running() -> tuple[bytes, int]:
    """Every field within its bounds: 300,000 one-byte raw segments, each its own zstd frame,
    between skeleton bytes of a 64 MiB target: ~5 s in-process here."""
    size, n = 64 << 20, 300_000
    raw = bytes(size - n)
    d = zstd.ZstdCompressionDict(BASE[TENSOR:], dict_type=zstd.DICT_TYPE_RAWCONTENT)
    frame = zstd.ZstdCompressor(dict_data=d).compress(raw)
    plane = zstd.ZstdCompressor().compress(b"\x01")
    header = {"target_size": size, "base_size": len(BASE), "chunk_bytes": 16,
              "base_ranges": [[0, TENSOR]], "skeleton": [0, len(frame), len(raw)],
              "segments": [[1, 1, "raw", 1, -1, 0, [len(plane)]]] * n}
    raw_json = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw_json) < codecs.header_json_limit(size, len(BASE))
    packed = zstd.ZstdCompressor(level=3).compress(raw_json)
    return (codecs.TX_PREFIX.pack(codecs.TX_MAGIC, 2, len(packed)) + packed + frame
            + plane * n), size


def test_header_crafted_to_run_long_is_killed_at_the_time_limit(tmp_path: Path) -> None:
    artifact, size = long_running()
    started = time.monotonic()
    with pytest.raises(DecodeLimitHit, match="did not finish within 1 s"):
        apply(tmp_path, artifact, "tensor-xor", target=b"x", target_size=size, timeout_s=1.0,
              max_memory_bytes=1 << 30)
    assert time.monotonic() - started < 30


def test_a_decoder_stopped_by_the_service_manager_is_not_a_refusal(tmp_path: Path) -> None:
    """systemd stops the whole cgroup with SIGTERM: the artifact is not at fault."""
    artifact, size = long_running()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            apply(tmp_path, artifact, "tensor-xor", target=b"x", target_size=size,
                  max_memory_bytes=1 << 30)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    children: list = []
    while not children and time.monotonic() < deadline and t.is_alive():
        children = [c for c in psutil.Process().children()
                    if "_decode_worker" in " ".join(c.cmdline())]
        time.sleep(0.02)  # poll pacing: a process appearing has no event to wait on
    assert children, "the decoder child did not start"
    children[0].send_signal(signal.SIGTERM)
    t.join(60)
    assert len(errors) == 1 and isinstance(errors[0], UpdateRejected)
    assert not isinstance(errors[0], ArtifactRefused)
    assert "stopped by signal 15" in str(errors[0])


def test_decode_over_the_memory_cap_inside_the_child_fails_there(tmp_path: Path) -> None:
    """The address-space cap holds even where no prediction did: a zstd-dict decode whose
    dictionary (the whole base) alone is over the child's budget."""
    base = tmp_path / "big-base"
    base.write_bytes(os.urandom(96 << 20))
    artifact = tmp_path / "patch"
    artifact.write_bytes(zstd.ZstdCompressor().compress(b"tiny target"))
    out = tmp_path / "out"
    out.touch()
    spec = {"codec": "zstd-dict", "artifact": {"file": str(artifact)}, "base": str(base),
            "out": str(out), "target_size": 11, "budget_bytes": 32 << 20, "timeout_s": 60,
            "parent_pid": os.getpid()}
    res = subprocess.run([sys.executable, "-I", "-m", confined.WORKER_MODULE, json.dumps(spec)],
                         capture_output=True, check=False, timeout=120)
    assert res.returncode == 3, res.stderr
    assert b"memory" in res.stderr
    assert out.read_bytes() == b""


# -- zstd and zstd-dict -----------------------------------------------------------------------
def zstd_dict_frame(target: bytes, **kw) -> bytes:
    d = zstd.ZstdCompressionDict(BASE, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    return zstd.ZstdCompressor(dict_data=d, **kw).compress(target)


@pytest.mark.parametrize("codec", ["zstd", "zstd-dict"])
def test_genuine_zstd_frames_decode_in_the_child(tmp_path: Path, codec: str) -> None:
    art = zstd.ZstdCompressor().compress(TARGET) if codec == "zstd" else zstd_dict_frame(TARGET)
    assert apply(tmp_path, art, codec).read_bytes() == TARGET


@pytest.mark.parametrize("codec", ["zstd", "zstd-dict"])
def test_frame_declaring_a_huge_content_size_is_refused_before_decoding(tmp_path: Path,
                                                                        codec: str) -> None:
    bomb = zstd.ZstdCompressor(level=1).compress(bytes(512 << 20))  # 16 KB, declares 512 MiB
    assert len(bomb) < 64 << 10
    with pytest.raises(ArtifactRefused, match="frame declares 536870912 output bytes"):
        apply(tmp_path, bomb, codec)


@pytest.mark.parametrize(("codec", "reason"), [
    ("zstd", "output is longer than the target"),
    ("zstd-dict", "declares no size, over its 32768-byte bound"),  # its window: base + target
])
def test_decompression_bomb_without_a_declared_size_is_stopped(tmp_path: Path, codec: str,
                                                               reason: str) -> None:
    bomb = zstd.ZstdCompressor(level=1, write_content_size=False).compress(bytes(512 << 20))
    with pytest.raises(ArtifactRefused, match=reason):
        apply(tmp_path, bomb, codec)


@pytest.mark.parametrize("codec", ["zstd", "zstd-dict"])
def test_frame_asking_for_a_huge_window_is_refused(tmp_path: Path, codec: str) -> None:
    params = zstd.ZstdCompressionParameters.from_level(3, window_log=31)
    stream = zstd.ZstdCompressor(compression_params=params).compressobj()  # size unknown
    big_window = stream.compress(TARGET) + stream.flush()
    with pytest.raises(ArtifactRefused, match="2147483648-byte window"):
        apply(tmp_path, big_window, codec)


@pytest.mark.parametrize("codec", ["zstd", "zstd-dict"])
def test_truncated_frames_are_refused(tmp_path: Path, codec: str) -> None:
    art = zstd.ZstdCompressor().compress(TARGET) if codec == "zstd" else zstd_dict_frame(TARGET)
    for cut in (2, 5, len(art) // 2, len(art) - 1):
        with pytest.raises(ArtifactRefused):
            apply(tmp_path, art[:cut], codec)


def test_zstd_frame_that_is_not_zstd_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactRefused, match="frame header is corrupt"):
        apply(tmp_path, b"MZ\x90\x00" + bytes(100), "zstd")


# -- finality ---------------------------------------------------------------------------------
def test_a_refused_artifact_stays_refused_across_restarts(tmp_path: Path) -> None:
    limits = {"memory_bytes": CAP, "timeout_s": 600.0}
    store = LocalStore(tmp_path)
    store.refuse_artifact("a" * 64, "tensor-xor header lies: chunk_bytes")
    store.refuse_artifact("b" * 64, "decoder did not finish", limits=limits)
    again = LocalStore(tmp_path)  # a restart: read from state.json
    assert again.artifact_refusal("a" * 64, limits) == "tensor-xor header lies: chunk_bytes"
    assert again.artifact_refusal("a" * 64, {"memory_bytes": 1 << 40, "timeout_s": 1e6})
    assert again.artifact_refusal("b" * 64, limits) == "decoder did not finish"
    assert again.artifact_refusal("b" * 64, {**limits, "timeout_s": 1200.0}) is None
    assert again.artifact_refusal("c" * 64, limits) is None  # another artifact: tried normally


def test_decode_starts_count_across_restarts_until_done(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    assert store.note_decode_start("a" * 64) == 1
    assert LocalStore(tmp_path).note_decode_start("a" * 64) == 2  # died mid-decode once
    store = LocalStore(tmp_path)
    store.decode_done("a" * 64)
    assert LocalStore(tmp_path).note_decode_start("a" * 64) == 1
