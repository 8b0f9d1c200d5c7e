"""BlobVerifier: a blob is hashed once per stat, a rewrite is caught, and a chunk that does
not match its hash is never handed out even when the file's stat did not change."""

from __future__ import annotations

from pathlib import Path

from deltafleet.server.store import BlobStore, BlobVerifier


def _corrupt(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\xff" * 7)


def test_a_blob_is_hashed_once_per_stat_and_a_rewrite_is_caught(tmp_path: Path):
    blobs = BlobStore(tmp_path)
    sha, _ = blobs.put_bytes(bytes(range(256)) * 40)
    v = BlobVerifier(blobs, 1024)
    assert v.check(sha).ok and len(v.check(sha).chunk_hashes) == 10
    assert v.hashed_bytes == 10240  # the second check hashed nothing
    _corrupt(blobs.path(sha), 5000)
    bad = v.check(sha)
    assert not bad.ok and bad.problem.startswith("corrupt")
    assert [p.sha256 for p in v.take_new_problems()] == [sha] and v.take_new_problems() == []
    assert v.chunk(sha, 0) is None  # nothing of a corrupt blob is handed out


def test_a_chunk_that_rots_under_an_unchanged_stat_is_refused(tmp_path: Path):
    blobs = BlobStore(tmp_path)
    sha, _ = blobs.put_bytes(b"x" * 4096)
    v = BlobVerifier(blobs, 1024)
    assert v.chunk(sha, 1) == b"x" * 1024
    _corrupt(blobs.path(sha), 1030)
    key, check = v._cache[sha]  # pretend the stat did not change (bit rot, a bad sector)
    v._cache[sha] = (v._key(blobs.path(sha).stat()), check)
    assert v.chunk(sha, 0) == b"x" * 1024
    assert v.chunk(sha, 1) is None
    assert not v.check(sha).ok and "chunk 1" in v.check(sha).problem


def test_restore_replaces_a_corrupt_blob_only_with_the_right_content(tmp_path: Path):
    blobs = BlobStore(tmp_path)
    good = tmp_path / "good.bin"
    good.write_bytes(b"model" * 100)
    sha, _ = blobs.put_file(good)
    _corrupt(blobs.path(sha), 10)
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(b"other")
    try:
        blobs.restore_file(wrong, sha)
        raise AssertionError("a file of another sha256 was accepted")
    except ValueError:
        pass
    assert blobs.put_file(good) == (sha, 500)  # re-adding the file heals the corrupt copy
    assert BlobVerifier(blobs, 64).check(sha).ok
