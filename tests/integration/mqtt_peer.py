"""A scripted server-side MQTT peer for agent tests: signs manifests with a key the test owns,
answers chunk requests from a file (optionally tampering), and records what devices say.

It speaks the real protocol through deltafleet.shared, on a real broker.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from deltafleet.shared import (
    ArtifactRef,
    ChunkRequest,
    Event,
    Manifest,
    SigningKey,
    Topics,
    chunk_hashes_file,
    decode,
    read_chunk,
    sha256_file,
)
from deltafleet.shared.mqtt import MqttClient, MqttSettings

CHUNK = 64 * 1024


class Peer:
    def __init__(self, broker_url: str, key: SigningKey) -> None:
        self.key = key
        self.topics = Topics()
        self.events: list[Event] = []
        self.requests: list[tuple[str, int]] = []  # (artifact sha, index) in arrival order
        self.artifacts: dict[str, Path] = {}
        self.tamper: Callable[[int, bytes], bytes | None] = lambda i, d: None
        self.client = MqttClient(MqttSettings(broker_url, f"test-peer-{uuid.uuid4().hex[:6]}"))
        self.client.subscribe(self.topics.all_devices("events"))
        self.client.subscribe(self.topics.all_devices("chunkreq"))
        self.client.start()
        self.client.wait_connected(10)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                topic, payload = self.client.inbox.get(timeout=0.1)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
            if topic.endswith("/events"):
                self.events.append(decode(Event, payload))
            elif topic.endswith("/chunkreq"):
                req = decode(ChunkRequest, payload)
                path = self.artifacts.get(req.artifact_sha256)
                for i in req.indices:
                    self.requests.append((req.artifact_sha256, i))
                    if path is None:
                        continue
                    data = read_chunk(path, i, CHUNK)
                    bad = self.tamper(i, data)
                    self.client.publish(self.topics.chunk(req.artifact_sha256, i),
                                        bad if bad is not None else data)

    def offer(self, device_id: str, model: str, version: str, target: Path, *,
              serial: int, artifact: Path | None = None, base_sha256: str | None = None,
              key: SigningKey | None = None) -> Manifest:
        """Publish a retained signed manifest; ``artifact`` (a bsdiff delta) defaults to the
        full target."""
        art = artifact or target
        sha = sha256_file(art)
        self.artifacts[sha] = art
        manifest = Manifest(
            manifest_id=uuid.uuid4().hex, device_id=device_id, serial=serial,
            issued_at=int(time.time()), expires_at=int(time.time()) + 3600, rollout_id=None,
            model=model, version=version, variant="default", format="onnx",
            target_sha256=sha256_file(target), target_size_bytes=target.stat().st_size,
            base_sha256=base_sha256,
            artifact=ArtifactRef("delta" if artifact else "full",
                                 "bsdiff4" if artifact else "identity", sha, art.stat().st_size,
                                 CHUNK, tuple(chunk_hashes_file(art, CHUNK))),
        )
        signed = (key or self.key).sign_bytes(manifest.to_wire())
        self.client.publish_wait(self.topics.desired(device_id, model), signed, retain=True)
        return manifest

    def wait_event(self, predicate: Callable[[Event], bool], timeout_s: float = 30) -> Event:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for ev in list(self.events):
                if predicate(ev):
                    return ev
            time.sleep(0.05)
        seen = [(e.device_id, e.state, e.reason) for e in self.events]
        raise TimeoutError(f"no matching event within {timeout_s} s; saw {seen}")
