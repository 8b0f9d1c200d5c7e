"""Fleet-scale benchmarks (JSON on stdout), against a real Mosquitto this script starts.

1. fanout: N simulated devices (default 1,000) take one rollout of a 1 MB artifact. Reports
   bytes the server published on artifact topics / artifact size (counted by a broker-side
   observer subscribed to every chunk topic), wall time to all healthy, server CPU seconds and
   peak RSS (the server runs as its own `fleetctl server` process).
2. heartbeats: N lightweight device connections (default 10,000; asyncio, raw MQTT 3.1.1, real
   deltafleet payloads) send a hello, then a status heartbeat every 30 s. Reports the time until
   every hello is in the database, then the server's CPU share and peak RSS over a steady window.
3. failover: two `fleetctl server` replicas on PostgreSQL share the device traffic; the one
   holding the rollout lease is killed mid-rollout; reports the time to completion.

BENCH_QUICK=1 runs small sizes; BENCH_ONLY=fanout,heartbeats,failover picks some.
Needs the mosquitto binary and, for failover, PostgreSQL at
127.0.0.1:5432 (skipped with a note when absent).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import secrets
import signal
import struct
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil

from deltafleet.server import catalog, fleet
from deltafleet.server.policy import RolloutPolicy
from deltafleet.server.rollouts import create_rollout, get_rollout, rollout_json
from deltafleet.server.store import BlobStore, Store, upgrade
from deltafleet.server.store.models import Device, Rollout
from deltafleet.shared import Hello, SigningKey, Status, encode
from deltafleet.shared.mqtt import MqttClient, MqttSettings
from tests.harness.fleetlab import Lab, wait_for
from tests.harness.fleetsim import SimFleet

QUICK = os.environ.get("BENCH_QUICK") == "1"
PG_URL = os.environ.get("FLEET_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


class Watch:
    """Samples a process's CPU time and RSS in the background."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.1)

    def cpu_s(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self._stop.set()


def setup(root: Path, db_url: str, model: Path, prefix: str, mqtt_url: str) -> tuple[Lab, Store]:
    lab = Lab(root, mqtt_url=mqtt_url, db_url=db_url)
    lab.env["FLEET_TOPIC_PREFIX"] = prefix
    home = Path(lab.env["FLEET_HOME"])
    upgrade(db_url)
    SigningKey.generate().save(home / "keys" / "signing.key", home / "keys" / "signing.pub")
    store = Store(db_url)
    with store.session() as s:
        catalog.add_model_version(s, BlobStore(home / "blobs"), "detector", "v1", model)
        fleet.create_group(s, "all", {"hw": "cam"})
    return lab, store


def rollout(store: Store, **policy) -> int:
    with store.session() as s:
        return create_rollout(s, "detector:v1", "all", "bench", policy=RolloutPolicy(**policy)).id


def status(store: Store, rid: int) -> dict:
    with store.session() as s:
        return rollout_json(s, get_rollout(s, rid), with_targets=False)


def artifact_bytes(store: Store, rid: int) -> int:
    """What one device downloads in this rollout (full models ship zstd-compressed)."""
    from sqlalchemy import func, select

    from deltafleet.server.store.models import RolloutTarget

    with store.session() as s:
        return int(s.scalar(select(func.max(RolloutTarget.bytes_to_send))
                            .where(RolloutTarget.rollout_id == rid)) or 0)


def count_chunk_publishes(mqtt_url: str, prefix: str) -> tuple[MqttClient, dict[str, int]]:
    """A broker-side observer on every artifact topic: it receives each server publish once,
    so its byte count is what the server published."""
    observer = MqttClient(MqttSettings(mqtt_url, f"bench-observer-{uuid.uuid4().hex[:6]}"))
    published = {"bytes": 0, "msgs": 0}
    observer.subscribe(f"{prefix}/art/#", qos=0)
    observer.start()
    observer.wait_connected(10)

    def count() -> None:
        while True:
            topic, payload = observer.inbox.get()
            if topic.startswith(prefix):
                published["bytes"] += len(payload)
                published["msgs"] += 1

    threading.Thread(target=count, daemon=True).start()
    return observer, published


SHARD = 250  # paho's select() loop cannot use file descriptors >= 1024: ~300 clients a process


def _sim_shard(mqtt_url: str, key: str, prefix: str, ids: list[str], ready, stop) -> None:
    """One process of simulated devices (spawned)."""
    fleet = SimFleet(mqtt_url, Path(key), prefix=prefix)
    for device_id in ids:
        fleet.add(device_id, {"hw": "cam"})
    fleet.wait_connected(300)
    ready.put(len(ids))
    stop.wait()
    fleet.close()


def sim_processes(mqtt_url: str, key: Path, prefix: str, n: int, id_prefix: str):
    """Start ``n`` simulated devices in shards of SHARD per process; returns (stop, procs)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    ids = [f"{id_prefix}-{i:05d}" for i in range(n)]
    procs = [ctx.Process(target=_sim_shard, daemon=True,
                         args=(mqtt_url, str(key), prefix, ids[i:i + SHARD], ready, stop))
             for i in range(0, n, SHARD)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=600)
    return stop, procs


def bench_fanout(tmp: Path, mqtt_url: str, model: Path, n: int) -> dict:
    prefix = f"b{uuid.uuid4().hex[:6]}/v1"
    lab, store = setup(tmp / "fanout", f"sqlite:///{tmp}/fanout.db", model, prefix, mqtt_url)
    observer, published = count_chunk_publishes(mqtt_url, prefix)
    stop = procs = None
    try:
        server = lab.start_server()
        watch = Watch(server.pid)
        stop, procs = sim_processes(mqtt_url, Path(lab.env["FLEET_HOME"]) / "keys" / "signing.pub",
                                    prefix, n, "cam")
        wait_for(lambda: store_count(store) >= n, 120, "devices registered", 0.5)
        cpu0 = watch.cpu_s()
        t0 = time.monotonic()
        rid = rollout(store, health_window_s=1, state_timeout_s=600)
        wait_for(lambda: status(store, rid)["state"] == "completed", 600, "rollout completed", 0.5)
        wall = time.monotonic() - t0
        time.sleep(1.0)
        size = artifact_bytes(store, rid)
        return {
            "devices": n, "artifact_bytes": size, "model_bytes": model.stat().st_size,
            "bytes_published": published["bytes"], "chunk_publishes": published["msgs"],
            "published_over_artifact": round(published["bytes"] / size, 3),
            "unicast_would_be": n,
            "wall_s_to_all_healthy": round(wall, 1),
            "server_cpu_s": round(watch.cpu_s() - cpu0, 2),
            "server_peak_rss_mb": round(watch.peak_rss / 2**20, 1),
        }
    finally:
        if stop is not None:
            stop.set()
            for p in procs or []:
                p.join(30)
        observer.stop()
        lab.close()
        store.dispose()


def store_count(store: Store) -> int:
    from sqlalchemy import func, select

    with store.session() as s:
        return int(s.scalar(select(func.count()).select_from(Device)) or 0)


# -- a minimal MQTT 3.1.1 client for many connections in one asyncio loop ----------------------
def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def _packet(kind: int, body: bytes) -> bytes:
    n, out = len(body), bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes([kind]) + bytes(out) + body


def _connect(client_id: str, will_topic: str, will: bytes, keepalive: int) -> bytes:
    flags = 0x02 | 0x04 | 0x20  # clean session, will, will retain (qos 0)
    body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + _str(client_id)
    return _packet(0x10, body + _str(will_topic) + struct.pack("!H", len(will)) + will)


def _publish(topic: str, payload: bytes, retain: bool = False) -> bytes:
    return _packet(0x30 | (1 if retain else 0), _str(topic) + payload)


async def _device(host: str, port: int, prefix: str, device_id: str, interval_s: float,
                  stop: asyncio.Event, connected: list[int]) -> None:
    t = f"{prefix}/dev/{device_id}"
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(_connect(f"hb-{device_id}", f"{t}/status",
                          encode(Status(device_id, False)), 120))
    await writer.drain()
    await reader.readexactly(4)  # CONNACK
    connected[0] += 1
    hello = Hello(device_id, "bench", {"arch": "x86_64", "os": "Linux", "cpu": "bench",
                                       "memory_bytes": 1 << 30, "accelerator": "none",
                                       "runtimes": {"onnxruntime": "1"},
                                       "disk_free_bytes": 1 << 34}, {"hw": "hb"}, ())
    writer.write(_publish(f"{t}/status", encode(Status(device_id, True)), retain=True))
    writer.write(_publish(f"{t}/hello", encode(hello)))
    await writer.drain()
    beat = encode(Status(device_id, True))
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
            except TimeoutError:
                writer.write(_publish(f"{t}/status", beat, retain=True))
                await writer.drain()
    finally:
        writer.write(b"\xe0\x00")  # DISCONNECT
        await writer.drain()
        writer.close()


class AsyncMqtt:
    """Just enough MQTT 3.1.1 for a simulated device in an asyncio loop: connect, subscribe,
    publish (QoS 0), receive QoS 0/1 publishes (acknowledged). Real deltafleet payloads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._mid = 0

    @classmethod
    async def connect(cls, host: str, port: int, client_id: str, will_topic: str,
                      will: bytes) -> AsyncMqtt:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        writer.write(_connect(client_id, will_topic, will, 0))
        await writer.drain()
        await reader.readexactly(4)  # CONNACK
        return cls(reader, writer)

    async def subscribe(self, topic: str) -> None:
        self._mid += 1
        self.writer.write(_packet(0x82, struct.pack("!H", self._mid) + _str(topic) + b"\x01"))
        await self.writer.drain()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.writer.write(_publish(topic, payload, retain))

    async def receive(self) -> tuple[str, bytes] | None:
        """The next PUBLISH (other packets are consumed); None when the connection closes."""
        while True:
            try:
                head = await self.reader.readexactly(1)
            except asyncio.IncompleteReadError:
                return None
            length, mult = 0, 1
            while True:
                b = (await self.reader.readexactly(1))[0]
                length += (b & 0x7F) * mult
                mult *= 128
                if not b & 0x80:
                    break
            body = await self.reader.readexactly(length)
            if head[0] >> 4 != 3:
                continue  # SUBACK, PUBACK, PINGRESP
            qos = (head[0] >> 1) & 3
            tlen = struct.unpack("!H", body[:2])[0]
            topic = body[2:2 + tlen].decode()
            pos = 2 + tlen
            if qos:
                self.writer.write(b"\x40\x02" + body[pos:pos + 2])  # PUBACK
                pos += 2
            return topic, body[pos:]


async def _fanout_device(host: str, port: int, prefix: str, device_id: str, trusted: list,
                         done: dict[str, float]) -> None:
    """A simulated device: hello, verified manifest (the agent's own checks), chunk requests,
    every chunk and the whole artifact checked against the signed hashes, then healthy."""
    from deltafleet import codecs
    from deltafleet.agent.errors import UpdateRejected
    from deltafleet.agent.update import verify_manifest
    from deltafleet.shared import ChunkRequest, Event, Topics, sha256_bytes

    t = Topics(prefix)
    mqtt = await AsyncMqtt.connect(host, port, f"fo-{device_id}", t.status(device_id),
                                   encode(Status(device_id, False)))
    await mqtt.subscribe(t.desired_filter(device_id))
    mqtt.publish(t.status(device_id), encode(Status(device_id, True)), retain=True)
    mqtt.publish(t.hello(device_id), encode(Hello(
        device_id, "bench", {"arch": "x86_64", "runtimes": {"onnxruntime": "1"}},
        {"hw": "cam"}, ())))
    await mqtt.writer.drain()
    chunks: dict[int, bytes] = {}
    manifest = None
    last = time.monotonic()
    while True:
        try:
            msg = await asyncio.wait_for(mqtt.receive(), 3.0)
        except TimeoutError:
            msg = ("", b"")
        if msg is None:
            return
        topic, payload = msg
        if "/desired/" in topic and payload and manifest is None:
            try:
                manifest = verify_manifest(payload, trusted, device_id=device_id)
            except UpdateRejected:
                continue
            await mqtt.subscribe(t.chunk_filter(manifest.artifact.sha256))
            mqtt.publish(t.chunk_request(device_id), encode(ChunkRequest(
                device_id, manifest.artifact.sha256, tuple(range(len(manifest.artifact.chunks))))))
            last = time.monotonic()
        elif manifest is not None and topic.startswith(f"{prefix}/art/"):
            index = int(topic.rsplit("/", 1)[1])
            if sha256_bytes(payload) == manifest.artifact.chunks[index]:
                chunks[index] = payload
                last = time.monotonic()
        elif manifest is not None and time.monotonic() - last > 3.0:
            missing = [i for i in range(len(manifest.artifact.chunks)) if i not in chunks]
            mqtt.publish(t.chunk_request(device_id), encode(ChunkRequest(
                device_id, manifest.artifact.sha256, tuple(missing))))
            last = time.monotonic()
        await mqtt.writer.drain()
        if manifest is not None and len(chunks) == len(manifest.artifact.chunks):
            data = b"".join(chunks[i] for i in range(len(chunks)))
            assert sha256_bytes(data) == manifest.artifact.sha256
            target = codecs.decode(manifest.artifact.codec, data, None,  # full: zstd / identity
                                   target_size=manifest.target_size_bytes)
            assert sha256_bytes(target) == manifest.target_sha256
            for state in ("trial", "healthy"):
                mqtt.publish(t.events(device_id), encode(Event(
                    uuid.uuid4().hex, device_id, manifest.manifest_id, manifest.rollout_id,
                    manifest.model, manifest.version, state, sha256=manifest.target_sha256)))
            await mqtt.writer.drain()
            done[device_id] = time.monotonic()
            mqtt.writer.close()
            return


def bench_fanout_async(tmp: Path, mqtt_url: str, model: Path, n: int) -> dict:
    """Fan-out with N asyncio devices in this process (no thread per device)."""
    from deltafleet.shared import load_public_key

    prefix = f"a{uuid.uuid4().hex[:6]}/v1"
    lab, store = setup(tmp / "fanout-async", f"sqlite:///{tmp}/fanout-async.db", model, prefix,
                       mqtt_url)
    host, port = "127.0.0.1", int(mqtt_url.rsplit(":", 1)[1])
    trusted = [load_public_key(Path(lab.env["FLEET_HOME"]) / "keys" / "signing.pub")]
    observer, published = count_chunk_publishes(mqtt_url, prefix)
    try:
        server = lab.start_server()
        watch = Watch(server.pid)
        wait_for(lambda: "connected" in lab.log("server"), 30, "server connected")
        result: dict = {"devices": n, "simulator": "asyncio, one process"}

        async def main() -> None:
            done: dict[str, float] = {}
            tasks = [asyncio.create_task(_fanout_device(host, port, prefix, f"cam-{i:05d}",
                                                        trusted, done)) for i in range(n)]
            while store_count(store) < n:
                await asyncio.sleep(0.5)
            cpu0 = watch.cpu_s()
            t0 = time.monotonic()
            rid = await asyncio.to_thread(rollout, store, health_window_s=0, state_timeout_s=600)
            rids.append(rid)
            while status(store, rid)["state"] != "completed":
                await asyncio.sleep(0.5)
                if time.monotonic() - t0 > 900:
                    raise TimeoutError("fan-out rollout did not complete in 900 s")
            result["wall_s_to_all_healthy"] = round(time.monotonic() - t0, 1)
            result["server_cpu_s"] = round(watch.cpu_s() - cpu0, 2)
            result["server_peak_rss_mb"] = round(watch.peak_rss / 2**20, 1)
            await asyncio.gather(*tasks, return_exceptions=True)

        rids: list[int] = []
        asyncio.run(main())
        time.sleep(1.0)
        size = artifact_bytes(store, rids[0])
        result.update(artifact_bytes=size, model_bytes=model.stat().st_size,
                      bytes_published=published["bytes"],
                      chunk_publishes=published["msgs"],
                      published_over_artifact=round(published["bytes"] / size, 3),
                      unicast_would_be=n)
        return result
    finally:
        observer.stop()
        lab.close()
        store.dispose()


def bench_heartbeats(tmp: Path, mqtt_url: str, model: Path, n: int, steady_s: float) -> dict:
    prefix = f"h{uuid.uuid4().hex[:6]}/v1"
    lab, store = setup(tmp / "hb", f"sqlite:///{tmp}/hb.db", model, prefix, mqtt_url)
    host, port = "127.0.0.1", int(mqtt_url.rsplit(":", 1)[1])
    try:
        server = lab.start_server()
        watch = Watch(server.pid)
        wait_for(lambda: "connected" in lab.log("server"), 30, "server connected")
        result: dict = {"devices": n, "heartbeat_interval_s": 30}

        async def main() -> None:
            stop = asyncio.Event()
            connected = [0]
            t0 = time.monotonic()
            tasks = []
            for i in range(n):
                tasks.append(asyncio.create_task(
                    _device(host, port, prefix, f"hb-{i:05d}", 30.0, stop, connected)))
                if i % 200 == 199:
                    await asyncio.sleep(0.05)  # connect in bursts, as a fleet reconnects
            while store_count(store) < n:
                await asyncio.sleep(0.5)
                if time.monotonic() - t0 > 600:
                    break
            result["connected"] = connected[0]
            result["hellos_in_db"] = store_count(store)
            result["s_until_all_hellos_in_db"] = round(time.monotonic() - t0, 1)
            await asyncio.sleep(2)
            cpu0, w0 = watch.cpu_s(), time.monotonic()
            await asyncio.sleep(steady_s)
            cpu = watch.cpu_s() - cpu0
            result["steady_window_s"] = round(time.monotonic() - w0, 1)
            result["server_cpu_share_of_one_core_pct"] = round(100 * cpu / steady_s, 1)
            result["server_peak_rss_mb"] = round(watch.peak_rss / 2**20, 1)
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(main())
        return result
    finally:
        lab.close()
        store.dispose()


def bench_failover(tmp: Path, mqtt_url: str, model: Path, n: int) -> dict:
    from sqlalchemy import create_engine, text

    name = f"fleet_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # noqa: BLE001
        return {"skipped": f"PostgreSQL not available: {str(e).splitlines()[0]}"}
    db_url = PG_URL.rsplit("/", 1)[0] + f"/{name}"
    prefix = f"f{uuid.uuid4().hex[:6]}/v1"
    lab, store = setup(tmp / "fo", db_url, model, prefix, mqtt_url)
    lab.env["FLEET_SHARE_GROUP"] = secrets.token_urlsafe(18)  # a secret, not a name
    fleet = SimFleet(mqtt_url, Path(lab.env["FLEET_HOME"]) / "keys" / "signing.pub", prefix=prefix)
    try:
        a = lab.start_server("server-a")
        lab.start_server("server-b")
        for i in range(n):
            fleet.add(f"fo-{i:04d}", {"hw": "cam"})
        fleet.wait_connected(60)
        wait_for(lambda: store_count(store) >= n, 60, "devices registered")
        rid = rollout(store, canary="5%", waves=(50.0, 100.0), health_window_s=2)
        wait_for(lambda: status(store, rid)["current_wave"] >= 1, 120, "wave 2 opened")
        with store.session() as s:
            owner = s.get(Rollout, rid).lease_owner
        pid = int(owner.split(":")[1])
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: status(store, rid)["state"] == "completed", 300, "rollout completed")
        took = time.monotonic() - t0
        twice = sum(1 for d in fleet.devices.values() if len(d.manifests) > 1)
        return {"devices": n, "killed": "server-a" if pid == a.pid else "server-b",
                "s_from_kill_to_completed": round(took, 1), "devices_updated_twice": twice}
    finally:
        fleet.close()
        lab.close()
        store.dispose()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    from tests.harness.modelgen import make_onnx_model

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp_s:
        tmp = Path(tmp_s)
        model = make_onnx_model(tmp / "m.onnx", size_mb=1.0)
        lab = Lab(tmp / "broker")
        lab.start_broker()
        try:
            only = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
            runs = {
                "fanout": lambda: bench_fanout_async(tmp, lab.mqtt_url, model,
                                                     100 if QUICK else 1000),
                "fanout_threads": lambda: bench_fanout(tmp, lab.mqtt_url, model,
                                                       100 if QUICK else 1000),
                "heartbeats": lambda: bench_heartbeats(tmp, lab.mqtt_url, model,
                                                       500 if QUICK else 10_000,
                                                       10 if QUICK else 60),
                "failover": lambda: bench_failover(tmp, lab.mqtt_url, model,
                                                   20 if QUICK else 100),
            }
            out: dict = {"machine": {"cores": os.cpu_count(), "memory_gb": round(
                psutil.virtual_memory().total / 2**30, 1)}}
            for name, run in runs.items():
                if not only or name in only:
                    out[name] = run()
        finally:
            lab.close()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
