"""A scripted server-side MQTT peer for agent tests: signs manifests with a key the test owns,
answers chunk requests from a file (optionally tampering), and records (and acks) what devices say.

It speaks the real protocol through deltafleet.shared, on a real broker.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltafleet.shared import (
    Ack,
    ArtifactRef,
    ChunkRequest,
    Event,
    Manifest,
    SigningKey,
    Topics,
    chunk_hashes_file,
    decode,
    encode,
    read_chunk,
    sha256_file,
)
from deltafleet.shared.mqtt import MqttClient, MqttSettings

CHUNK = 64 * 1024


def subscribed_client(broker_url: str, name: str, *topics: str) -> MqttClient:
    """A started client ``<name>-<random>`` subscribed to ``topics``, connected within 10 s."""
    client = MqttClient(MqttSettings(broker_url, f"{name}-{uuid.uuid4().hex[:6]}"))
    for topic in topics:
        client.subscribe(topic)
    client.start()
    client.wait_connected(10)
    return client


class Peer:
    def __init__(self, broker_url: str, key: SigningKey) -> None:
        self.key = key
        self.topics = Topics()
        self.events: list[Event] = []
        self.requests: list[tuple[str, int]] = []  # (artifact sha, index) in arrival order
        self.artifacts: dict[str, Path] = {}
        self.signed: dict[str, bytes] = {}  # manifest_id -> the signed bytes published
        self.statuses: list[tuple[str, bytes]] = []  # (topic, payload) of device status
        self.tamper: Callable[[int, bytes], bytes | None] = lambda i, d: None
        self.client = subscribed_client(broker_url, "test-peer",
                                        *(self.topics.all_devices(kind)
                                          for kind in ("events", "chunkreq", "status")))
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
            if topic.endswith("/status"):
                self.statuses.append((topic, payload))
            elif topic.endswith("/events"):
                ev = decode(Event, payload)
                self.events.append(ev)
                # as the server does once it has recorded an event: the outbox may delete it
                self.client.publish(self.topics.ack(ev.device_id),
                                    encode(Ack(ev.device_id, (ev.event_id,))), qos=1)
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
              key: SigningKey | None = None, expires_at: int | None = None,
              publish_to: str | None = None, codec: str = "bsdiff4", **fields: Any) -> Manifest:
        """Publish a retained signed manifest; ``artifact`` (a bsdiff delta) defaults to the
        full target (``codec`` names the delta's codec). ``fields`` sets further manifest fields (trial_window_s, health_policy,
        io_signature, allow_io_change, golden_inputs, hardware_id). ``publish_to`` puts it on
        another device's topic (a manifest for the wrong device)."""
        art = artifact or target
        sha = sha256_file(art)
        self.artifacts[sha] = art
        manifest = Manifest(
            manifest_id=uuid.uuid4().hex, device_id=device_id, serial=serial,
            issued_at=int(time.time()),
            expires_at=int(time.time()) + 3600 if expires_at is None else expires_at,
            rollout_id=None,
            model=model, version=version, variant="default", format="onnx",
            target_sha256=sha256_file(target), target_size_bytes=target.stat().st_size,
            base_sha256=base_sha256,
            artifact=ArtifactRef("delta" if artifact else "full",
                                 codec if artifact else "identity", sha, art.stat().st_size,
                                 CHUNK, tuple(chunk_hashes_file(art, CHUNK))),
            **fields,
        )
        signed = (key or self.key).sign_bytes(manifest.to_wire())
        self.signed[manifest.manifest_id] = signed
        self.publish_manifest(publish_to or device_id, model, signed)
        return manifest

    def publish_manifest(self, device_id: str, model: str, payload: bytes) -> None:
        """Publish raw bytes as the retained desired state (replays, tampered envelopes)."""
        self.client.publish_wait(self.topics.desired(device_id, model), payload, retain=True)

    def publish_trust(self, bundle: bytes) -> None:
        """Publish a trust bundle (root chain + key list) on the retained trust topic."""
        from deltafleet.shared import trust_topic

        self.client.publish_wait(trust_topic(self.topics.prefix), bundle, retain=True)

    def device_events(self, device_id: str) -> list[Event]:
        return [e for e in list(self.events) if e.device_id == device_id]

    def wait_event(self, predicate: Callable[[Event], bool], timeout_s: float = 30) -> Event:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for ev in list(self.events):
                if predicate(ev):
                    return ev
            time.sleep(0.05)
        seen = [(e.device_id, e.state, e.reason) for e in self.events]
        raise TimeoutError(f"no matching event within {timeout_s} s; saw {seen}")


# -- models that misbehave, for trial and IO-contract tests (built with onnx.helper) ----------

def start_with_v1(lab, peer: Peer, pub: Path, v1: Path, device: str, **env: str) -> Any:
    """An agent (API on a free port) trusting ``pub``, running ``v1`` of ``detector`` offered by
    the peer; returns its local API client once v1 is healthy."""
    from deltafleet.agent.client import AgentClient  # noqa: PLC0415
    from tests.harness.fleetlab import free_port, wait_port  # noqa: PLC0415

    port = free_port()
    lab.start_agent(device, {"hw": "test"}, trusted_key=pub,
                    extra_env={"FLEET_AGENT_API_PORT": str(port), **env})
    peer.offer(device, "detector", "v1", v1, serial=1)
    peer.wait_event(lambda e: e.device_id == device and e.state == "healthy", 60)
    wait_port(port)
    return AgentClient(port=port)


def _save_onnx(path: Path, nodes: list, inputs: list, outputs: list, inits: list) -> Path:
    from onnx import helper

    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def make_slow_model(path: Path, *, input_dim: int = 64, output_dim: int = 10,
                    width: int = 512, depth: int = 200) -> Path:
    """Same IO as modelgen's MLP, but a chain of ``depth`` [width x width] MatMuls (sharing
    one weight, so the file stays small) makes every inference milliseconds slower."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    w_in = (rng.standard_normal((input_dim, width)) / np.sqrt(input_dim)).astype(np.float32)
    w_mid = np.eye(width, dtype=np.float32)
    w_out = (rng.standard_normal((width, output_dim)) / np.sqrt(width)).astype(np.float32)
    inits = [numpy_helper.from_array(w_in, "w_in"), numpy_helper.from_array(w_mid, "w_mid"),
             numpy_helper.from_array(w_out, "w_out")]
    nodes = [helper.make_node("MatMul", ["input", "w_in"], ["h0"])]
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w_mid"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{depth}", "w_out"], ["output"]))
    return _save_onnx(
        path, nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", input_dim])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", output_dim])], inits)


def make_nan_on_negative_model(path: Path, *, input_dim: int = 64, output_dim: int = 10) -> Path:
    """Same IO as modelgen's MLP, ``output = sqrt(input) @ w``: zero inputs (smoke test,
    warm-up) give finite answers, any negative input gives NaN, which the agent counts as a
    failed inference."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(3).standard_normal((input_dim, output_dim)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Sqrt", ["input"], ["root"]),
             helper.make_node("MatMul", ["root", "w"], ["output"])]
    return _save_onnx(
        path, nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", input_dim])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", output_dim])],
        [numpy_helper.from_array(w, "w")])


def make_linear_model(path: Path, *, input_dim: int = 64, output_dim: int = 10,
                      seed: int = 5) -> Path:
    """A tiny one-layer model: a fallback, or (with another input_dim) a changed IO contract."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(seed).standard_normal((input_dim, output_dim)) * 0.1).astype(np.float32)
    return _save_onnx(
        path, [helper.make_node("MatMul", ["input", "w"], ["output"])],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", input_dim])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", output_dim])],
        [numpy_helper.from_array(w, "w")])
