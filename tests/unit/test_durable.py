"""staged_file: a file appears at its destination complete and verified, or not at all."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deltafleet.shared import StagedMismatch, VerificationError, atomic_copy, staged_file

DATA = b"model bytes " * 1000
SHA = hashlib.sha256(DATA).hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_a_verified_write_lands_at_dest_with_its_hash_size_and_mode(tmp_path: Path) -> None:
    dest = tmp_path / "model.onnx"
    with staged_file(dest, expect_sha256=SHA, expect_size=len(DATA), mode=0o600) as out:
        for i in range(0, len(DATA), 999):
            out.write(DATA[i : i + 999])
        assert not dest.exists()  # nothing at dest before the block ends
    assert dest.read_bytes() == DATA
    assert (out.sha256, out.size) == (SHA, len(DATA))
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("kwargs", "what"), [
    ({"expect_sha256": "0" * 64}, "sha256"),
    ({"expect_size": len(DATA) + 1}, "size"),
])
def test_a_mismatch_leaves_no_file_and_no_temp(tmp_path: Path, kwargs: dict, what: str) -> None:
    dest = tmp_path / "model.onnx"
    with pytest.raises(StagedMismatch) as caught, staged_file(dest, **kwargs) as out:
        out.write(DATA)
    assert caught.value.what == what and isinstance(caught.value, VerificationError)
    assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_a_mismatch_keeps_the_old_file(tmp_path: Path) -> None:
    dest = tmp_path / "state.json"
    dest.write_bytes(b"old")
    with pytest.raises(StagedMismatch), staged_file(dest, expect_sha256=SHA) as out:
        out.write(b"not the data")
    assert dest.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_writing_past_the_expected_size_is_refused_at_once(tmp_path: Path) -> None:
    dest = tmp_path / "model.onnx"
    with pytest.raises(StagedMismatch, match="longer"), staged_file(dest, expect_size=4) as out:
        out.write(b"12")
        out.write(b"345")
    assert out.size == 2  # the write that would overrun was not made
    assert not dest.exists() and leftovers(tmp_path) == []


def test_an_error_in_the_block_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    dest = tmp_path / "model.onnx"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError), staged_file(dest) as out:
        out.write(DATA)
        raise RuntimeError("decoder failed")
    assert dest.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_a_crash_before_the_replace_leaves_the_old_file(tmp_path: Path) -> None:
    """A process killed mid-write (os._exit: no cleanup runs) leaves dest as it was; only a
    temp file is left, which LocalStore.clean_temp_files removes on the next start."""
    dest = tmp_path / "model.onnx"
    dest.write_bytes(b"old")
    code = textwrap.dedent(f"""
        import os
        from deltafleet.shared import staged_file
        with staged_file({str(dest)!r}) as out:
            out.write(b"half of the new")
            os._exit(9)
    """)
    proc = subprocess.run([sys.executable, "-c", code], check=False, timeout=60)
    assert proc.returncode == 9
    assert dest.read_bytes() == b"old"
    temps = leftovers(tmp_path)
    assert len(temps) == 1 and temps[0].startswith(".model.onnx.")


def test_bytes_another_process_wrote_are_rehashed_and_verified(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with staged_file(dest, expect_sha256=SHA, expect_size=len(DATA)) as out:
        out.path.write_bytes(DATA)  # as the contained decoder child does
        out.rehash()
    assert dest.read_bytes() == DATA


def test_a_content_addressed_dest_is_chosen_from_the_hash(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    root.mkdir()

    def dest_of(sha: str) -> Path:
        (root / sha[:2]).mkdir(exist_ok=True)
        return root / sha[:2] / sha

    with staged_file(dest_of, temp_dir=root) as out:
        out.write(DATA)
    assert (root / SHA[:2] / SHA).read_bytes() == DATA
    with staged_file(lambda sha: None, temp_dir=root) as out:  # already there: dropped
        out.write(DATA)
    assert leftovers(root) == [] and os.listdir(root) == [SHA[:2]]


def test_atomic_copy_streams_through_staged_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(DATA)
    atomic_copy(src, tmp_path / "sub" / "dst", mode=0o640)
    assert (tmp_path / "sub" / "dst").read_bytes() == DATA
    assert stat.S_IMODE((tmp_path / "sub" / "dst").stat().st_mode) == 0o640


def test_a_full_disk_leaves_no_temp_behind(tmp_path: Path) -> None:
    """The write fails when the buffer is flushed, and again when the temp file is closed;
    the temp file is removed all the same (RLIMIT_FSIZE stands in for a full disk)."""
    dest = tmp_path / "event.json"
    code = textwrap.dedent(f"""
        import resource, signal
        from deltafleet.shared import staged_file
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (10, resource.RLIM_INFINITY))
        try:
            with staged_file({str(dest)!r}) as out:
                out.write(b"x" * 100)
        except OSError as e:
            print(e.errno)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert proc.stdout.strip() == "27"  # EFBIG
    assert not dest.exists() and leftovers(tmp_path) == []
