"""Hostile input against the agent's pure update checks: each one is refused before it can
change anything, in the order update.py documents, with a reason that says which check."""

from __future__ import annotations

import base64
import bz2
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import bsdiff4
import pytest

from deltafleet.agent import _decode_worker, confined
from deltafleet.agent.config import AgentConfig
from deltafleet.agent.errors import SignatureRejected, UpdateRejected
from deltafleet.agent.trust import STATE_FILE, RootTrust
from deltafleet.agent.update import (
    MAX_MANIFEST_BYTES,
    ChunkSet,
    apply_artifact,
    check_disk,
    verify_manifest,
)
from deltafleet.shared import (
    ArtifactRef,
    KeyList,
    Manifest,
    RootMetadata,
    SigningKey,
    TrustBundle,
    canonical_json,
    sha256_bytes,
    sign_payload,
)
from tests import factories

CHUNK = 1024
NOW = int(time.time())
BASE = bytes(range(256)) * 40
TARGET = BASE[:5000] + b"retrained-head" * 20 + BASE[5280:]
KEY = SigningKey.generate()


def manifest(artifact: bytes, target: bytes = TARGET, *, codec: str = "bsdiff4",
             **overrides) -> Manifest:
    ref = factories.artifact_ref(artifact, kind="delta" if codec == "bsdiff4" else "full",
                                 codec=codec, chunk_bytes=CHUNK)
    fields = dict(manifest_id="m-5", serial=5, issued_at=NOW, expires_at=NOW + 600,
                  base_sha256=sha256_bytes(BASE) if codec == "bsdiff4" else None, artifact=ref)
    return factories.manifest(target=target, **{**fields, **overrides})


def check(m: Manifest, *, signer: SigningKey = KEY, data: bytes | None = None, **kw) -> Manifest:
    args = dict(device_id="dev-1", hardware_id="hw-1", last_serial=4, now=NOW)
    args.update(kw)
    return verify_manifest(data if data is not None else signer.sign_bytes(m.to_wire()),
                           [KEY.public_key], **args)


@pytest.fixture
def base_file(tmp_path: Path) -> Path:
    p = tmp_path / "base.onnx"
    p.write_bytes(BASE)
    return p


def test_a_good_manifest_passes_every_check() -> None:
    m = manifest(bsdiff4.diff(BASE, TARGET), hardware_id="hw-1")
    assert check(m) == m


# -- manifest ---------------------------------------------------------------------------------
def test_manifest_over_the_size_cap_is_refused_before_parsing() -> None:
    with pytest.raises(UpdateRejected, match="cap"):
        check(manifest(TARGET), data=b"{" + b" " * MAX_MANIFEST_BYTES + b"}")


def test_manifest_of_a_4_gib_artifact_with_golden_inputs_fits_the_cap() -> None:
    chunk = 65536  # what the server uses
    chunks = tuple(sha256_bytes(i.to_bytes(4, "little")) for i in range((4 << 30) // chunk))
    golden = ({"input": {"dtype": "float32", "shape": [1024, 64],
                         "b64": base64.b64encode(bytes(256 * 1024)).decode()}},)
    m = dataclasses.replace(
        manifest(TARGET, codec="identity"), golden_inputs=golden,
        artifact=ArtifactRef("full", "identity", sha256_bytes(b"x"), 4 << 30, chunk, chunks))
    data = KEY.sign_bytes(m.to_wire())
    assert len(data) > 4 << 20
    assert check(m, data=data) == m


def test_tampered_manifest_is_refused_for_its_signature() -> None:
    env = json.loads(KEY.sign_bytes(manifest(TARGET, codec="identity").to_wire()))
    env["payload"]["target_sha256"] = sha256_bytes(b"evil model")
    with pytest.raises(SignatureRejected, match="signature"):
        check(manifest(TARGET), data=canonical_json(env))


def test_replayed_older_manifest_is_refused() -> None:
    old = manifest(TARGET, codec="identity", manifest_id="m-3", serial=3)
    with pytest.raises(UpdateRejected, match="serial 3 <= 4"):
        check(old)


def test_manifest_with_the_last_serial_seen_is_refused_unless_it_is_the_one_held() -> None:
    same = manifest(TARGET, codec="identity", manifest_id="m-4", serial=4)
    with pytest.raises(UpdateRejected, match="replayed"):
        check(same)
    assert check(same, known_ids={"m-4"}) == same  # re-delivery of the manifest in progress


def test_expired_manifest_is_refused() -> None:
    with pytest.raises(UpdateRejected, match="expired"):
        check(manifest(TARGET, codec="identity", expires_at=NOW - 1))


def test_manifest_for_another_device_is_refused() -> None:
    with pytest.raises(UpdateRejected, match="device dev-2"):
        check(manifest(TARGET, codec="identity", device_id="dev-2"))


def test_manifest_for_another_hardware_id_is_refused() -> None:
    with pytest.raises(UpdateRejected, match="hardware 'hw-other'"):
        check(manifest(TARGET, codec="identity", hardware_id="hw-other"))


def test_manifest_without_hardware_binding_is_accepted_on_any_hardware() -> None:
    m = manifest(TARGET, codec="identity")
    assert m.hardware_id is None and "hardware_id" not in m.to_wire()
    assert check(m, hardware_id=None) == m


def test_checks_stop_at_the_first_failure_in_order() -> None:
    everything_wrong = manifest(TARGET, codec="identity", serial=1, expires_at=1,
                                device_id="dev-2", hardware_id="hw-2")
    with pytest.raises(UpdateRejected, match="replayed"):
        check(everything_wrong)
    with pytest.raises(UpdateRejected, match="expired"):
        check(everything_wrong, last_serial=0)


def test_artifact_that_does_not_fit_free_disk_is_refused() -> None:
    m = manifest(TARGET, codec="identity")
    with pytest.raises(UpdateRejected, match="not enough disk"):
        check_disk(m, free_bytes=len(TARGET))
    check_disk(m, free_bytes=len(TARGET), have_bytes=len(TARGET))  # chunks already on disk
    with pytest.raises(UpdateRejected, match="cap"):
        check_disk(m, free_bytes=1 << 40, max_artifact_bytes=100)


# -- chunks and the artifact ------------------------------------------------------------------
def test_truncated_oversized_misplaced_and_stray_chunks_are_refused(tmp_path: Path) -> None:
    full = random.Random(1).randbytes(5 * CHUNK + 100)
    m = manifest(full, full, codec="identity")
    chunks = ChunkSet(m, tmp_path / "dl")
    good = [full[i:i + CHUNK] for i in range(0, len(full), CHUNK)]
    assert not chunks.accept(0, good[0][:-1])  # truncated
    assert not chunks.accept(0, good[0] + b"x")  # oversized
    assert not chunks.accept(0, good[1])  # misplaced: a real chunk at the wrong index
    assert not chunks.accept(len(good), good[0])  # stray index
    assert chunks.rejected == 3 and not chunks.have and not list((tmp_path / "dl").iterdir())
    for i, data in enumerate(good):  # nothing lost: the right bytes are still accepted
        assert chunks.accept(i, data)
    assert chunks.assemble() == full


def test_artifact_hash_mismatch_drops_the_chunks(tmp_path: Path) -> None:
    m = manifest(TARGET, codec="identity")
    lying = dataclasses.replace(m, artifact=dataclasses.replace(
        m.artifact, sha256=sha256_bytes(b"another artifact")))
    chunks = ChunkSet(lying, tmp_path / "dl")
    for i in range(chunks.total):
        assert chunks.accept(i, TARGET[i * CHUNK:(i + 1) * CHUNK])
    with pytest.raises(UpdateRejected, match="artifact hash mismatch"):
        chunks.assemble()
    assert not chunks.have and not list((tmp_path / "dl").iterdir())


# -- bspatch ----------------------------------------------------------------------------------
def bsdiff_patch(ctrl: bytes, diff: bytes, extra: bytes, new_size: int, *,
                 lengths: tuple[int, int] | None = None) -> bytes:
    """A BSDIFF40 patch: magic, three int64 (control len, diff len, new size), three bz2."""
    c, d, e = bz2.compress(ctrl), bz2.compress(diff), bz2.compress(extra)
    lc, ld = lengths or (len(c), len(d))
    return b"BSDIFF40" + b"".join(bspatch_int64(n) for n in (lc, ld, new_size)) + c + d + e


def bspatch_int64(n: int) -> bytes:
    raw = bytearray(abs(n).to_bytes(8, "little"))
    if n < 0:
        raw[7] |= 0x80
    return bytes(raw)


def test_delta_applies_in_the_child_process(base_file: Path) -> None:
    patch = bsdiff4.diff(BASE, TARGET)
    assert bytes(apply_artifact(manifest(patch), patch, base_file)) == TARGET
    assert base_file.read_bytes() == BASE


def test_bz2_bomb_inside_a_bsdiff_patch_is_refused(base_file: Path) -> None:
    ctrl = b"".join(bspatch_int64(n) for n in (len(TARGET), 0, 0))
    bomb = bsdiff_patch(ctrl, b"\0" * (64 << 20), b"", len(TARGET))  # 64 MiB from ~100 bytes
    assert len(bomb) < 4096
    with pytest.raises(UpdateRejected, match="bz2 bomb"):
        apply_artifact(manifest(bomb), bomb, base_file)
    assert base_file.read_bytes() == BASE


def test_bsdiff_patch_with_negative_lengths_is_refused(base_file: Path) -> None:
    good = bsdiff4.diff(BASE, TARGET)
    for lengths in [(-1, 10), (10, -(1 << 40))]:
        bad = bsdiff_patch(b"", b"", b"", len(TARGET), lengths=lengths)
        with pytest.raises(UpdateRejected, match="negative length"):
            apply_artifact(manifest(bad), bad, base_file)
    negative_size = good[:24] + bspatch_int64(-len(TARGET)) + good[32:]
    with pytest.raises(UpdateRejected, match="negative length"):
        apply_artifact(manifest(negative_size), negative_size, base_file)


def test_patch_whose_header_lies_about_the_output_size_is_refused(base_file: Path) -> None:
    good = bsdiff4.diff(BASE, TARGET)
    lying = good[:24] + bspatch_int64(1 << 40) + good[32:]
    with pytest.raises(UpdateRejected, match="declares 1099511627776 output bytes"):
        apply_artifact(manifest(lying), lying, base_file)


def run_worker(codec: str, artifact: Path, base: Path | None, out: Path, target_size: int,
               budget: int = 256 << 20, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """The contained decoder child, started by hand (no parent-side checks)."""
    spec = {"codec": codec, "artifact": {"file": str(artifact)},
            "base": str(base) if base else None, "out": str(out), "target_size": target_size,
            "budget_bytes": budget, "timeout_s": timeout_s, "parent_pid": os.getpid()}
    return subprocess.run([sys.executable, "-I", "-m", confined.WORKER_MODULE, json.dumps(spec)],
                          capture_output=True, check=False, timeout=120)


def test_child_refuses_bad_headers_even_without_the_parent_check(base_file: Path,
                                                                 tmp_path: Path) -> None:
    bad = bsdiff_patch(b"", b"", b"", len(TARGET), lengths=(-5, 3))
    (tmp_path / "patch").write_bytes(bad)
    out = tmp_path / "out"
    out.touch()
    res = run_worker("bsdiff4", tmp_path / "patch", base_file, out, len(TARGET))
    assert res.returncode == _decode_worker.EXIT_REFUSED
    assert b"bad lengths" in res.stderr
    assert out.read_bytes() == b""


def test_control_triples_that_overrun_the_output_are_refused(base_file: Path) -> None:
    ctrl = b"".join(bspatch_int64(n) for n in (len(TARGET), 5, 0))  # x + y > new size
    bad = bsdiff_patch(ctrl, b"\0" * len(TARGET), b"\0" * 5, len(TARGET))
    with pytest.raises(UpdateRejected, match="past the declared output size"):
        apply_artifact(manifest(bad), bad, base_file)
    short = bsdiff_patch(b"".join(bspatch_int64(n) for n in (10, 0, 0)), b"\0" * 10, b"",
                         len(TARGET))
    with pytest.raises(UpdateRejected, match="patch produced 10 bytes"):
        apply_artifact(manifest(short), short, base_file)


def test_patch_over_the_memory_cap_is_refused_before_it_runs(base_file: Path) -> None:
    patch = bsdiff4.diff(BASE, TARGET)
    with pytest.raises(UpdateRejected, match="over the 1 MiB cap"):
        apply_artifact(manifest(patch), patch, base_file, max_memory_bytes=1 << 20)


def test_patch_that_runs_too_long_is_killed(base_file: Path) -> None:
    patch = bsdiff4.diff(BASE, TARGET)
    with pytest.raises(UpdateRejected, match="did not finish"):
        apply_artifact(manifest(patch), patch, base_file, timeout_s=0.001)


def test_patch_producing_another_target_of_the_same_size_is_refused(base_file: Path) -> None:
    other = TARGET[:-1] + b"!"
    patch = bsdiff4.diff(BASE, other)
    with pytest.raises(UpdateRejected, match="target hash mismatch"):
        apply_artifact(manifest(patch), patch, base_file)


# -- root of trust on the device ---------------------------------------------------------------
def keylist(version: int, online: SigningKey, *signers: SigningKey) -> dict:
    return sign_payload(KeyList(version, NOW - 60, NOW + 3600,
                                {online.keyid: online.public_key}).to_wire(), list(signers))


def root(version: int, key: SigningKey, *signers: SigningKey) -> dict:
    return sign_payload(RootMetadata(version, {key.keyid: key.public_key}).to_wire(),
                        list(signers))


def test_device_trust_follows_rotations_persists_them_and_refuses_the_old_key(
        tmp_path: Path) -> None:
    r1, r2, k1, k2, k3 = (SigningKey.generate() for _ in range(5))
    root1 = root(1, r1, r1)
    (tmp_path / "root.json").write_bytes(canonical_json(root1))
    (tmp_path / "trust.json").write_bytes(TrustBundle((root1,), keylist(1, k1, r1)).to_bytes())
    cfg = AgentConfig(device_id="dev-1", state_dir=tmp_path / "state",
                      root_of_trust=tmp_path / "root.json",
                      trust_bundle=tmp_path / "trust.json")
    (tmp_path / "state").mkdir()
    trust = RootTrust.open(cfg, NOW)
    m = manifest(TARGET, codec="identity")
    assert verify_manifest(k1.sign_bytes(m.to_wire()), trust, device_id="dev-1", now=NOW) == m

    assert trust.apply(TrustBundle((root1,), keylist(2, k2, r1)).to_bytes(), NOW)
    with pytest.raises(SignatureRejected):
        verify_manifest(k1.sign_bytes(m.to_wire()), trust, device_id="dev-1", now=NOW)

    root2 = root(2, r2, r1, r2)
    assert trust.apply(TrustBundle((root1, root2), keylist(3, k3, r2)).to_bytes(), NOW)
    forged = root(3, SigningKey.generate(), r2)  # new root signed by the old one only
    with pytest.raises(UpdateRejected, match="trust bundle refused"):
        trust.apply(TrustBundle((root1, root2, forged), keylist(4, k1, r2)).to_bytes(), NOW)

    again = RootTrust.open(cfg, NOW)  # restart: state from disk, the enrollment files ignored
    assert (tmp_path / "state" / STATE_FILE).exists()
    assert again.store.root.version == 2 and again.store.keylist.version == 3
    for old in (k1, k2):
        with pytest.raises(SignatureRejected):
            verify_manifest(old.sign_bytes(m.to_wire()), again, device_id="dev-1", now=NOW)
    assert verify_manifest(k3.sign_bytes(m.to_wire()), again, device_id="dev-1", now=NOW) == m
