"""A full disk never takes a device offline (issue 11, item 5).

A real fleet-agent process whose state directory is a small tmpfs the test mounts itself (root
needed; under CI=true a failed mount fails the run), against a real Mosquitto and a scripted
server peer: an update that does not fit is refused with a reason and the agent keeps serving
and stays connected; a disk filled in the middle of a download is survived, reported, and the
update completes on its own once the filler is deleted; leftover chunks and temp files go.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from deltafleet.agent.client import AgentClient
from deltafleet.shared import sha256_file
from tests.harness.fleetlab import wait_for
from tests.harness.mqtt_peer import CHUNK, Peer
from tests.harness.need import missing

pytestmark = pytest.mark.broker

TMPFS_BYTES = 8 << 20
MARGIN_BYTES = 256 << 10
ENV = {"FLEET_AGENT_DISK_MARGIN_BYTES": str(MARGIN_BYTES), "FLEET_AGENT_DISK_RETRY_S": "0.5",
       "FLEET_AGENT_HEARTBEAT_S": "1"}


@pytest.fixture
def lab(fresh_lab) -> Iterator:
    """A Lab whose device dev-1 has its state directory on an 8 MiB tmpfs."""
    lab = fresh_lab
    state = lab.agent_dir("dev-1")
    state.mkdir(parents=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs",
                          str(state)], capture_output=True, text=True)
    if res.returncode != 0:
        missing(f"a tmpfs mount (needs root: {res.stderr.strip()})")
    try:
        yield lab
    finally:
        lab.close()
        subprocess.run(["umount", "-l", str(state)], check=False)


@pytest.fixture
def peer(lab, key) -> Iterator[Peer]:
    """The test-side server on the lab's own broker (the conftest's is on the shared one)."""
    with contextlib.closing(Peer(lab.mqtt_url, key[0])) as p:
        yield p


@pytest.fixture
def fillers(lab) -> Iterator[list[Path]]:
    """The filler files a test appends; removed after it, before its lab goes."""
    made: list[Path] = []
    yield made
    for f in made:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f)


def fill(directory: Path, leave_bytes: int = 0) -> Path:
    """A filler file taking all the free space of ``directory``'s filesystem but
    ``leave_bytes``."""
    filler = directory / "filler"
    block = b"\xff" * (64 << 10)
    with open(filler, "ab", buffering=0) as f:
        while shutil.disk_usage(directory).free > leave_bytes:
            room = shutil.disk_usage(directory).free - leave_bytes
            try:
                f.write(block[:max(4096, min(len(block), room))])
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
    return filler


def serves(port: int, version: str) -> bool:
    with AgentClient(port=port, timeout_s=10) as c:
        return c.predict("detector", np.zeros((1, 64), np.float32)).version == version


def chunk_files(state: Path) -> list[Path]:
    return [p for p in (state / "downloads").glob("*/*") if p.name.isdigit()]


def leftovers(state: Path) -> list[str]:
    """Chunks and temp files left in the state directory."""
    found = [p for p in (state / "downloads").rglob("*") if p.is_file()]
    found += [p for p in state.rglob(".*.tmp")]
    return sorted(str(p.relative_to(state)) for p in found)


def start_on_v1(lab, peer: Peer, pub: Path, v1: Path):
    proc = lab.start_agent("dev-1", {"hw": "test"}, trusted_key=pub, extra_env=ENV)
    peer.offer("dev-1", "detector", "v1", v1, serial=1)
    ev = peer.wait_event(lambda e: e.state in ("healthy", "failed", "rejected"), 90)
    assert ev.state == "healthy", ev.reason
    return proc


def fill_before_chunk(state: Path, index: int, what: str, fillers: list[Path], *,
                      leave_bytes: int = 0) -> Callable[[int, bytes], bytes | None]:
    """A peer tamper hook: before chunk ``index`` goes out, wait until the ``index`` chunks
    before it are on the device (``what``), then fill its disk, leaving ``leave_bytes``, once;
    the filler file is appended to ``fillers``."""

    def tamper(i: int, data: bytes) -> bytes | None:
        if i == index and not fillers:  # (on the peer's thread: the chunk waits for this)
            wait_for(lambda: len(chunk_files(state)) >= index, 60, what)
            fillers.append(fill(state, leave_bytes=leave_bytes))
        return None

    return tamper


def offer_v2_on_v1(lab, peer: Peer, pub: Path, v1: Path, v2: Path,
                   tamper: Callable[[int, bytes], bytes | None]):
    """The agent healthy on v1, then v2 offered through ``tamper``: its process, API port and
    the v2 manifest."""
    proc = start_on_v1(lab, peer, pub, v1)
    port = lab.api_ports["dev-1"]
    peer.tamper = tamper
    return proc, port, peer.offer("dev-1", "detector", "v2", v2, serial=2)


def test_update_that_does_not_fit_is_refused_with_a_reason_then_installs_once_space_is_back(
        lab, key, models, peer) -> None:
    _, pub = key
    v1, v2 = models
    state = lab.agent_dir("dev-1")
    stray = state / "downloads" / ("e" * 64)  # chunks of an artifact nobody wants any more
    stray.mkdir(parents=True)
    (stray / "0").write_bytes(b"old chunk")
    (stray / ".1.abc.tmp").write_bytes(b"half a chunk")
    proc = start_on_v1(lab, peer, pub, v1)
    assert not stray.exists()  # removed at start
    port = lab.api_ports["dev-1"]
    # room for the artifact, but not for artifact + target + margin
    filler = fill(state, leave_bytes=v2.stat().st_size + MARGIN_BYTES)
    m2 = peer.offer("dev-1", "detector", "v2", v2, serial=2)
    ev = peer.wait_event(lambda e: e.manifest_id == m2.manifest_id, 60)
    assert ev.state == "waiting"  # not a failure: the device goes on by itself
    assert ev.reason.startswith("not enough disk: ") and "retrying" in ev.reason
    assert ev.sha256 == sha256_file(v1)
    assert not [r for r in peer.requests if r[0] == m2.artifact.sha256]  # nothing fetched
    assert proc.poll() is None
    assert serves(port, "v1")
    heartbeats = len(peer.statuses)
    wait_for(lambda: len(peer.statuses) > heartbeats + 1, 30, "online heartbeats")
    assert peer.statuses[-1][1] != b"" and b"false" not in peer.statuses[-1][1].lower()

    filler.unlink()  # space is back: the same manifest goes on, nobody re-sends anything
    ev = peer.wait_event(lambda e: e.manifest_id == m2.manifest_id
                         and e.state in ("healthy", "failed", "rolled_back"), 90)
    assert ev.state == "healthy", ev.reason
    wait_for(lambda: serves(port, "v2"), 30, "v2 to answer")
    assert lab.agent_status("dev-1")[0]["sha256"] == sha256_file(v2)
    assert leftovers(state) == []
    assert proc.poll() is None


def test_disk_filled_mid_download_is_survived_and_the_update_finishes_when_space_is_back(
        lab, key, models, peer, fillers: list[Path]) -> None:
    _, pub = key
    v1, v2 = models
    state = lab.agent_dir("dev-1")
    # the disk is full from chunk 5 on
    fill_before_chunk_5 = fill_before_chunk(state, 5, "chunks 0-4 on the device", fillers)
    proc, port, m2 = offer_v2_on_v1(lab, peer, pub, v1, v2, fill_before_chunk_5)
    wait_for(lambda: "held back: disk full writing chunk" in lab.log("agent-dev-1"), 60,
             "the agent to hit the full disk")
    assert proc.poll() is None
    assert serves(port, "v1")  # local inference goes on, on the current model
    # the outbox could not store the report either: it waits in memory, said in the log
    wait_for(lambda: "kept in memory, not in the outbox" in lab.log("agent-dev-1"), 30,
             "the agent to say it holds the report in memory")
    fetched = len(peer.requests)
    time.sleep(2)  # deliberate: no chunk request may go out while the disk is full
    assert len(peer.requests) == fetched

    fillers[0].unlink()
    ev = peer.wait_event(lambda e: e.manifest_id == m2.manifest_id
                         and e.state in ("healthy", "rolled_back"), 90)
    assert ev.state == "healthy", ev.reason
    said = [e for e in peer.events if e.manifest_id == m2.manifest_id]
    # first the chunk write, then (retries while the disk is still full) the space check;
    # once each (a re-send before the ack keeps its id; the server applies an id once)
    waited = list({e.event_id: e for e in said if e.state == "waiting"}.values())
    assert 1 <= len(waited) <= 2, [(e.event_id, e.reason) for e in waited]
    assert waited[0].reason.startswith("disk full writing chunk")
    assert all("retrying when space is back" in e.reason for e in waited)
    assert not [e for e in said if e.state in ("failed", "rejected")]
    resumed = [e for e in said if e.state == "downloading"][-1]
    assert resumed.chunks_reused >= 5  # the chunks written before the disk filled
    assert proc.poll() is None
    wait_for(lambda: serves(port, "v2"), 30, "v2 to answer")
    assert leftovers(state) == []


def test_disk_filled_before_the_target_is_written_keeps_the_chunks_and_installs_later(
        lab, key, models, peer, fillers: list[Path]) -> None:
    _, pub = key
    v1, v2 = models
    state = lab.agent_dir("dev-1")
    total = -(-v2.stat().st_size // CHUNK)
    last = v2.stat().st_size - (total - 1) * CHUNK
    # room for the last chunk, the journal and a report; not for the 1 MB target
    fill_before_the_last_chunk = fill_before_chunk(
        state, total - 1, "all but one chunk", fillers,
        leave_bytes=-(-last // 4096) * 4096 + (64 << 10))
    proc, port, m2 = offer_v2_on_v1(lab, peer, pub, v1, v2, fill_before_the_last_chunk)
    ev = peer.wait_event(lambda e: e.manifest_id == m2.manifest_id
                         and e.state == "waiting", 60)
    assert ev.reason.startswith("disk full writing the target"), ev.reason
    assert ev.sha256 == sha256_file(v1)
    assert proc.poll() is None and serves(port, "v1")
    assert len(chunk_files(state)) == total  # the verified artifact waits on disk
    asked = len(peer.requests)

    fillers[0].unlink()
    ev = peer.wait_event(lambda e: e.manifest_id == m2.manifest_id
                         and e.state in ("healthy", "rolled_back"), 90)
    assert ev.state == "healthy", ev.reason
    assert len(peer.requests) == asked  # nothing fetched again
    wait_for(lambda: serves(port, "v2"), 30, "v2 to answer")
    assert leftovers(state) == []
