"""Hostile artifacts against a real fleet-agent (real Mosquitto, scripted signing peer): every
decode runs in the contained child within ``patch_memory_bytes``; the agent plus its child
stay under the cap (sampled with psutil); a refused artifact is reported once and never
decoded again — not after a restart, not under a new manifest — while a new artifact is
tried normally; an agent killed while decoding leaves no decoder behind and, after one
retry, refuses the artifact instead of looping."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zstandard as zstd

from deltafleet import codecs
from deltafleet.shared import SigningKey, TrustBundle, sha256_file
from tests.harness.background import Background
from tests.harness.mqtt_peer import Peer

from .test_agent_security import HW, Device, keylist_env, root_env

pytestmark = pytest.mark.broker
CAP = 256 << 20


@pytest.fixture
def lab(fresh_lab):
    """Every test here gets a broker of its own."""
    return fresh_lab


def device(lab, *, timeout_s: float = 120.0) -> tuple[Device, Peer]:
    r1, k1 = SigningKey.generate(), SigningKey.generate()
    root1 = root_env(1, r1, r1)
    dev = Device(lab, root1, TrustBundle((root1,), keylist_env(1, k1, r1)).to_bytes())
    with dev.config.open("a") as f:
        f.write(f"patch_memory_bytes = {CAP}\npatch_timeout_s = {timeout_s}\n")
    return dev, Peer(lab.mqtt_url, k1)


def tensor_xor(base: Path, out: Path, *, target_size: int, skeleton_raw: int,
               chunk_bytes: int = codecs.TX_CHUNK_BYTES, segments: list | None = None,
               planes: bytes = b"") -> Path:
    """A tensor-xor v1 artifact against ``base`` (no base ranges: the whole base is the
    skeleton dictionary) whose skeleton frame holds ``skeleton_raw`` zero bytes."""
    d = zstd.ZstdCompressionDict(base.read_bytes(), dict_type=zstd.DICT_TYPE_RAWCONTENT)
    cctx = zstd.ZstdCompressor(dict_data=d, level=3)
    frame = cctx.compress(bytes(skeleton_raw) if skeleton_raw <= 256 << 20 else b"")
    header = {"target_size": target_size, "base_size": base.stat().st_size,
              "chunk_bytes": chunk_bytes, "base_ranges": [],
              "skeleton": [0, len(frame), skeleton_raw], "segments": segments or []}
    packed = zstd.ZstdCompressor(level=3).compress(json.dumps(header,
                                                              separators=(",", ":")).encode())
    out.write_bytes(codecs.TX_PREFIX.pack(codecs.TX_MAGIC, 1, len(packed)) + packed + frame
                    + planes)
    return out


def claimed_target(path: Path, size: int) -> Path:
    """A file of ``size`` bytes whose sha256 the manifest signs (the decode never makes it)."""
    with path.open("wb") as f:
        f.truncate(size - 1)
        f.seek(size - 1)
        f.write(b"!")  # the skeletons here are zeros: never the same bytes
    return path


class RssSampler(Background):
    """Peak resident memory of the agent alone, its decoder children alone, and both."""

    interval_s = 0.01  # the memory sampling interval

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.agent_peak = self.child_peak = self.total_peak = 0
        self.children_seen: set[int] = set()
        self.start()

    def step(self) -> bool:
        try:
            agent = self.proc.memory_info().rss
            child = 0
            for c in self.proc.children(recursive=True):
                try:
                    child += c.memory_info().rss
                    self.children_seen.add(c.pid)
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            return False
        self.agent_peak = max(self.agent_peak, agent)
        self.child_peak = max(self.child_peak, child)
        self.total_peak = max(self.total_peak, agent + child)
        return True


@contextlib.contextmanager
def agent_on_v1(lab, v1: Path) -> Iterator[tuple[Device, Peer, subprocess.Popen]]:
    """A device (``device``) whose agent runs ``v1`` (serial 1) healthy, its peer and its
    process; the peer is closed after."""
    dev, peer = device(lab)
    try:
        proc = dev.start()
        first = peer.offer(dev.id, "detector", "v1", v1, serial=1, hardware_id=HW)
        peer.wait_event(lambda e: e.manifest_id == first.manifest_id and e.state == "healthy",
                        90)
        yield dev, peer, proc
    finally:
        peer.close()


def decodes_logged(lab, dev: Device) -> int:
    return lab.log(f"agent-{dev.id}").count("artifact of")


def failed(peer: Peer, manifest_id: str) -> list:
    return [e for e in list(peer.events) if e.manifest_id == manifest_id and e.state == "failed"]


def test_hostile_tensor_xor_stays_under_the_cap_and_is_never_decoded_again(lab, models,
                                                                            tmp_path):
    v1, v2 = models
    with agent_on_v1(lab, v1) as (dev, peer, proc):
        base_rss = psutil.Process(proc.pid).memory_info().rss
        sampler = RssSampler(proc.pid)
        v1_sha = sha256_file(v1)

        # The artifact: a few KB whose header asks for 1 TiB chunks and a 3 GiB graph.
        lying = tensor_xor(v1, tmp_path / "lying.tx", target_size=v2.stat().st_size,
                           skeleton_raw=3 << 30, chunk_bytes=1 << 40)
        assert lying.stat().st_size < 64 << 10
        m_lying = peer.offer(dev.id, "detector", "v2", v2, serial=2, artifact=lying,
                             codec="tensor-xor", base_sha256=v1_sha)
        ev = peer.wait_event(lambda e: e.manifest_id == m_lying.manifest_id
                             and e.state in ("failed", "healthy"), 60)
        assert ev.state == "failed" and "chunk_bytes 1099511627776" in ev.reason

        # Consistent but heavy: a 128 MiB graph the child really holds, within the cap.
        heavy_target = claimed_target(tmp_path / "heavy.onnx", 128 << 20)
        heavy = tensor_xor(v1, tmp_path / "heavy.tx", target_size=128 << 20,
                           skeleton_raw=128 << 20)
        m_heavy = peer.offer(dev.id, "detector", "v3", heavy_target, serial=3, artifact=heavy,
                             codec="tensor-xor", base_sha256=v1_sha)
        ev = peer.wait_event(lambda e: e.manifest_id == m_heavy.manifest_id
                             and e.state in ("failed", "healthy"), 120)
        assert ev.state == "failed" and "target hash mismatch" in ev.reason
        sampler.stop()
        print(f"agent before {base_rss >> 20} MiB, agent peak {sampler.agent_peak >> 20} MiB, "
              f"child peak {sampler.child_peak >> 20} MiB, both {sampler.total_peak >> 20} MiB, "
              f"cap {CAP >> 20} MiB")
        assert sampler.children_seen, "no decoder child was observed"
        assert sampler.child_peak > 128 << 20  # the child did hold the graph ...
        assert sampler.child_peak <= CAP  # ... within the cap
        assert sampler.agent_peak - base_rss < 64 << 20  # the agent itself did not decode
        assert sampler.total_peak <= base_rss + CAP
        assert decodes_logged(lab, dev) == 3  # v1 (identity), lying, heavy
        assert dev.version() == "v1"

        # Restart: the retained manifest arrives again; nothing is decoded, nothing re-sent.
        dev.stop()
        dev.start()
        # A new manifest shipping the refused artifact again: refused without a decode.
        fetched = len(peer.requests)
        again = peer.offer(dev.id, "detector", "v2", v2, serial=4, artifact=lying,
                           codec="tensor-xor", base_sha256=v1_sha)
        ev = peer.wait_event(lambda e: e.manifest_id == again.manifest_id
                             and e.state in ("failed", "healthy"), 60)
        assert "artifact refused earlier, not decoded again" in ev.reason
        assert len(peer.requests) == fetched  # not even downloaded
        # A new artifact is tried normally.
        good = peer.offer(dev.id, "detector", "v2", v2, serial=5)
        peer.wait_event(lambda e: e.manifest_id == good.manifest_id and e.state == "healthy", 90)
        assert decodes_logged(lab, dev) == 4  # only the good one after the restart
        for m in (m_lying, m_heavy, again):
            assert len({e.event_id for e in failed(peer, m.manifest_id)}) == 1
        assert dev.version() == "v2"


def long_running(base: Path, out: Path, target_size: int) -> Path:
    """Every field within its bounds, seconds of decoding: 150,000 one-byte raw segments."""
    n = 150_000
    plane = zstd.ZstdCompressor().compress(b"\x01")
    segments = [[2 * i + 1, 1, "raw", 1, 0, [len(plane)]] for i in range(n)]
    return tensor_xor(base, out, target_size=target_size, skeleton_raw=target_size - n,
                      chunk_bytes=16, segments=segments, planes=plane * n)


def wait_decoder(pid: int, timeout_s: float = 60) -> psutil.Process:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for c in psutil.Process(pid).children():
            try:
                if "_decode_worker" in " ".join(c.cmdline()):
                    return c
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.02)  # poll pacing: a process appearing has no event to wait on
    raise TimeoutError("no decoder child started")


def test_agent_killed_while_decoding_retries_once_then_refuses_the_artifact(lab, models,
                                                                           tmp_path):
    v1, _ = models
    with agent_on_v1(lab, v1) as (dev, peer, proc):
        size = 32 << 20
        art = long_running(v1, tmp_path / "long.tx", size)
        m = peer.offer(dev.id, "detector", "v2", claimed_target(tmp_path / "t.onnx", size),
                       serial=2, artifact=art, codec="tensor-xor", base_sha256=sha256_file(v1))
        for _ in range(2):  # power loss / OOM kill of the agent in the middle of the decode
            child = wait_decoder(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            child.wait(30)  # dies with its parent (PR_SET_PDEATHSIG)
            assert not child.is_running()
            dev.stop()
            proc = dev.start()
        ev = peer.wait_event(lambda e: e.manifest_id == m.manifest_id and e.state == "failed", 90)
        assert "stopped while decoding this artifact 2 times" in ev.reason
        assert not [c for c in psutil.Process(proc.pid).children()
                    if "_decode_worker" in " ".join(c.cmdline())]
        assert dev.version() == "v1"
        assert lab.log(f"agent-{dev.id}").count("tensor-xor artifact of") == 2
