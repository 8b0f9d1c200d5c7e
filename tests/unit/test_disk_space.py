"""Disk space on the device: the space check's arithmetic, and what a full disk (ENOSPC or
EDQUOT) does to chunk writes and state.json. The real full disk is
tests/integration/test_hostile_disk.py (a small tmpfs)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from deltafleet.agent import store as store_module
from deltafleet.agent import update as update_module
from deltafleet.agent.config import load_config
from deltafleet.agent.errors import ConfigError, NoSpace, UpdateRejected, is_no_space
from deltafleet.agent.store import InstalledModel, LocalStore
from deltafleet.agent.update import ChunkSet, check_disk, chunk_bytes_on_disk, space_needed
from deltafleet.shared import Manifest, sha256_bytes
from tests import factories

CHUNK = 1024
ARTIFACT = bytes(range(256)) * 12  # 3072 bytes: 3 chunks
TARGET_SIZE = 5000
MiB = 1 << 20


def manifest(artifact: bytes = ARTIFACT, target_size: int = TARGET_SIZE) -> Manifest:
    chunks = tuple(sha256_bytes(artifact[i:i + CHUNK]) for i in range(0, len(artifact), CHUNK))
    return factories.manifest(
        manifest_id="m-1", expires_at=2**31, rollout_id=None, version="v1",
        target_sha256="a" * 64, target_size_bytes=target_size,
        artifact=factories.artifact_ref(artifact, chunk_bytes=CHUNK, chunks=chunks))


# -- the arithmetic ---------------------------------------------------------------------------
def test_space_needed_is_artifact_still_to_fetch_plus_target_plus_margin() -> None:
    m = manifest()
    assert space_needed(m) == 3072 + 5000
    assert space_needed(m, margin_bytes=100) == 3072 + 5000 + 100
    assert space_needed(m, have_bytes=1024, margin_bytes=100) == 2048 + 5000 + 100
    # chunks on disk never count for more than the artifact, nor below nothing
    assert space_needed(m, have_bytes=10**9) == 5000
    assert space_needed(m, have_bytes=-5, margin_bytes=-5) == 3072 + 5000


def test_an_update_that_exactly_fits_is_accepted_and_one_byte_less_is_refused() -> None:
    m = manifest()
    need = 3072 + 5000 + 512
    check_disk(m, free_bytes=need, margin_bytes=512)
    with pytest.raises(NoSpace) as refused:
        check_disk(m, free_bytes=need - 1, margin_bytes=512)
    reason = str(refused.value)
    assert reason.startswith("not enough disk: ")
    assert "target" in reason and "margin" in reason and "free in the state directory" in reason
    assert "\n" not in reason


def test_what_other_downloads_still_need_is_held_back_from_the_free_space() -> None:
    m = manifest()
    need = space_needed(m, margin_bytes=0)
    check_disk(m, free_bytes=need + 4 * MiB, reserved_bytes=4 * MiB)
    with pytest.raises(NoSpace, match="held for other downloads"):
        check_disk(m, free_bytes=need + 4 * MiB, reserved_bytes=4 * MiB + 1)


def test_chunks_already_on_disk_count_as_fetched_on_resume() -> None:
    m = manifest()
    with pytest.raises(NoSpace):
        check_disk(m, free_bytes=5000 + 1024, margin_bytes=0)
    check_disk(m, free_bytes=5000 + 1024, have_bytes=2048, margin_bytes=0)


def test_an_artifact_over_the_cap_is_a_final_refusal_not_a_wait_for_space() -> None:
    with pytest.raises(UpdateRejected, match="cap") as refused:
        check_disk(manifest(), free_bytes=1 << 40, max_artifact_bytes=100)
    assert not isinstance(refused.value, NoSpace)


def test_chunk_bytes_on_disk_counts_chunk_files_only(tmp_path: Path) -> None:
    assert chunk_bytes_on_disk(tmp_path / "absent") == 0
    (tmp_path / "0").write_bytes(b"x" * 1024)
    (tmp_path / "1").write_bytes(b"x" * 10)
    (tmp_path / ".2.abc.tmp").write_bytes(b"x" * 999)  # a half-written chunk
    assert chunk_bytes_on_disk(tmp_path) == 1034


# -- a full disk on the writes ----------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_chunk_write_on_a_full_disk_is_no_space_and_the_chunk_is_not_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    m = manifest()
    chunks = ChunkSet(m, tmp_path / "dl")

    def full(path: Path, data: bytes, **_: object) -> None:
        raise OSError(code, "No space left on device")

    monkeypatch.setattr(update_module, "atomic_write_bytes", full)
    with pytest.raises(NoSpace, match="disk full writing chunk 0"):
        chunks.accept(0, ARTIFACT[:CHUNK])
    assert chunks.have == set() and chunks.missing() == [0, 1, 2]
    monkeypatch.undo()
    assert chunks.accept(0, ARTIFACT[:CHUNK])  # space back: the same chunk is taken


def test_a_chunk_write_failing_for_another_reason_is_not_taken_for_a_full_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = ChunkSet(manifest(), tmp_path / "dl")

    def broken(path: Path, data: bytes, **_: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(update_module, "atomic_write_bytes", broken)
    with pytest.raises(OSError) as e:
        chunks.accept(0, ARTIFACT[:CHUNK])
    assert not isinstance(e.value, NoSpace) and not is_no_space(e.value)


def test_temp_files_left_in_a_download_are_removed_and_verified_chunks_kept(
        tmp_path: Path) -> None:
    d = tmp_path / "dl"
    d.mkdir()
    (d / "0").write_bytes(ARTIFACT[:CHUNK])
    (d / ".1.x1y2.tmp").write_bytes(b"half a chunk")
    chunks = ChunkSet(manifest(), d)
    assert chunks.have == {0}
    assert sorted(p.name for p in d.iterdir()) == ["0"]


def test_state_json_failing_to_write_leaves_memory_as_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = LocalStore(tmp_path)
    v1 = InstalledModel("m", "v1", "1" * 64, "default", "onnx", 1, "m-1")
    st.activate(v1)

    def full(path: Path, value: object, **_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "atomic_write_json", full)
    with pytest.raises(OSError):
        st.activate(InstalledModel("m", "v2", "2" * 64, "default", "onnx", 2, "m-2"))
    with pytest.raises(OSError):
        st.mark_failed("m", "m-3", 3)
    assert st.current("m") == v1 and st.previous("m") is None
    assert st.failed_manifest("m") is None and st.last_serial_of("m") == 1
    monkeypatch.undo()
    assert LocalStore(tmp_path).current("m") == v1


def test_downloads_of_artifacts_no_longer_wanted_are_removed(tmp_path: Path) -> None:
    st = LocalStore(tmp_path)
    for sha in ("a" * 64, "b" * 64):
        st.download_dir(sha).mkdir()
        (st.download_dir(sha) / "0").write_bytes(b"chunk")
    (st.downloads_dir / "stray").write_bytes(b"?")
    assert sorted(st.drop_downloads_except({"a" * 64})) == ["b" * 64, "stray"]
    assert [p.name for p in st.downloads_dir.iterdir()] == ["a" * 64]


def test_disk_margin_and_retry_come_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "k.pub"
    key.write_text("x")
    monkeypatch.setenv("FLEET_AGENT_DISK_MARGIN_BYTES", "1048576")
    monkeypatch.setenv("FLEET_AGENT_DISK_RETRY_S", "0.5")
    cfg = load_config(device_id="dev-1", trusted_keys=[str(key)])
    assert (cfg.disk_margin_bytes, cfg.disk_retry_s) == (1 << 20, 0.5)
    monkeypatch.setenv("FLEET_AGENT_DISK_RETRY_S", "0")
    with pytest.raises(ConfigError, match="disk_retry_s"):
        load_config(device_id="dev-1", trusted_keys=[str(key)])
