"""Fleet-scale benchmarks: one JSON document on stdout, exit status 1 when any run failed.

Every run starts its own Mosquitto (so the broker's peak RSS is that run's) and its own
``fleetctl server`` process on a fresh database, and samples both processes' CPU and RSS.

1. ``fanout`` (``--devices 500,1000,2000,5000``: one run per size): N simulated devices in this
   process take one rollout of a ``--artifact-mb`` model. Each device is a fleetsim
   ``SimDevice`` driving the agent's own ``UpdateMachine`` (verified manifest, chunk requests
   and retries, every chunk, the artifact and the decoded target checked against the signed
   hashes, trial, reports with stable event ids); only its MQTT runs as a task in one asyncio
   loop (``AsyncSimDevice``: one socket per device, no thread). Reports published bytes on the
   artifact topics / artifact size (a broker-side observer counts every server publish once),
   time to all healthy, server CPU-s (total and per device), server and broker peak RSS, and
   the simulator's own CPU and RSS (on 2 cores it competes with the server). Beside the
   rollout an operator's ``fleetctl`` reads (rollout status, device list, rollout list) run one
   after the other as processes; their wall time, start-up included, is reported (a read that
   fails, e.g. ``database is locked``, fails the run; ``--no-cli-reads`` leaves them out),
   with ``fleetctl --help`` beside them as the cost of a start under the same load, and with
   ``--api-reads`` each read again through the management API (``FLEET_API_URL``, a viewer
   token; the server answers them, so its CPU figures include that). The
   simulated devices run at ``--sim-nice`` (10): they stand for devices on other machines, so
   the server, the broker and the operator's reads get the CPU first; ``simulator_cpu_s``
   still says what they took.
2. ``fanout_threads``: the same with plain ``SimFleet`` devices (two threads and one paho client
   each) in spawned processes of ``SHARD`` devices; a cross-check that the asyncio transport is
   not what is measured. Not run unless named in ``--only``.
3. ``heartbeats`` (``--heartbeat-devices``): N raw MQTT 3.1.1 connections (asyncio, real
   deltafleet payloads) send a hello, then a status heartbeat every 30 s. Reports the time until
   every hello is in the database, then the server's CPU share over a steady window.
4. ``failover``: two ``fleetctl server`` replicas on PostgreSQL; the one holding the rollout
   lease is killed mid-rollout; reports the time to completion.

A run is ``"ok": true`` only when it is whole: every one of the N devices ends healthy on the
target, counted twice -- the store's rollout targets (state healthy, target sha256 = the model's)
and the simulated devices' own state (the sha256 they run, a healthy report for the rollout) --
and, for heartbeats, all N connected and all N hellos in the database. Anything less is listed
in ``"failures"`` and makes the exit status 1; its figures are kept for diagnosis but are not a
result. Benchmark rollouts use ``--max-attempts 1`` so a device failure is final at once instead
of hidden by a retry. ``--fail-devices K`` makes the first K fan-out devices fail their apply
(``Knobs.fail_apply``), to prove the bench reports it.

The targets in ``targets.json`` (key ``fleet_scale``) are checked and reported under
``"targets"``; a missed target is reported, it does not change the exit status.

Every flag has an environment fallback (for ``run_all``): BENCH_DEVICES, BENCH_HEARTBEAT_DEVICES,
BENCH_HEARTBEAT_STEADY_S, BENCH_FAILOVER_DEVICES, BENCH_ARTIFACT_MB, BENCH_FAIL_DEVICES,
BENCH_ONLY; BENCH_QUICK=1 selects the small defaults. Needs the mosquitto binary and, for
failover, PostgreSQL at 127.0.0.1:5432 (skipped with a note when absent).

Where the simulator is the limit: an asyncio device costs one socket (the script raises
RLIMIT_NOFILE to its hard limit, which Mosquitto inherits; the server holds one socket in
all), tens of KiB of Python objects plus its stream buffers, and no thread; chunk payloads and
installed models are interned across devices (each device still verifies the bytes it
received), so memory stays far below N x artifact. Its CPU (per device: hash every chunk,
assemble, decode and hash the target) runs on the same 2 cores as the server and the broker:
``simulator_cpu_s`` says how much.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from deltafleet.agent import machine as mc
from deltafleet.server import catalog, fleet
from deltafleet.server.policy import RolloutPolicy
from deltafleet.server.rollouts import create_rollout, get_rollout, rollout_json
from deltafleet.server.store import BlobStore, Store, upgrade
from deltafleet.server.store.models import Device, Rollout, RolloutTarget
from deltafleet.shared import Hello, SigningKey, Status, encode, sha256_file
from deltafleet.shared.mqtt import CONNECTED, MqttClient, MqttSettings
from tests.harness.background import Background
from tests.harness.fleetlab import Lab, free_port, wait_for
from tests.harness.fleetsim import SimDevice, SimFleet

HERE = Path(__file__).resolve().parent
QUICK = os.environ.get("BENCH_QUICK") == "1"
PG_URL = os.environ.get("FLEET_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
MODEL = "detector"
IN_FLIGHT = frozenset({"notified", "downloading", "applying", "trial", "held", "reverting"})
ROLLOUT_FINAL = frozenset({"aborted", "rolled_back", "superseded"})
SHARD = 250  # paho's select() loop cannot use file descriptors >= 1024: ~300 clients a process


class Watch(Background):
    """Samples a process's CPU time and RSS in the background."""

    interval_s = 0.1

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak_rss = 0
        self.start()

    def step(self) -> bool:
        try:
            self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
        except psutil.Error:
            return False
        return True

    def cpu_s(self) -> float:
        try:
            t = self.proc.cpu_times()
        except psutil.Error:
            return 0.0
        return t.user + t.system

    @property
    def peak_rss_mb(self) -> float:
        return round(self.peak_rss / 2**20, 1)


class Watches:
    """Server, broker and this process, from one starting point."""

    def __init__(self, server_pid: int, broker_pid: int) -> None:
        self.server, self.broker, self.me = Watch(server_pid), Watch(broker_pid), Watch(os.getpid())
        self.mark()

    def mark(self) -> None:
        self.t0 = time.monotonic()
        self.cpu0 = (self.server.cpu_s(), self.broker.cpu_s(), self.me.cpu_s())

    def figures(self, n: int) -> dict[str, Any]:
        server, broker, me = (w.cpu_s() - c for w, c in zip(
            (self.server, self.broker, self.me), self.cpu0, strict=True))
        return {"server_cpu_s": round(server, 2),
                "server_cpu_s_per_device": round(server / n, 4) if n else None,
                "server_peak_rss_mb": self.server.peak_rss_mb,
                "broker_cpu_s": round(broker, 2), "broker_peak_rss_mb": self.broker.peak_rss_mb,
                "simulator_cpu_s": round(me, 2), "simulator_peak_rss_mb": self.me.peak_rss_mb}

    def stop(self) -> None:
        for w in (self.server, self.broker, self.me):
            w.stop()


class CliReads:
    """``fleetctl`` reads an operator runs while the rollout is in flight, one after the other
    (rollout status, device list, rollout list), each timed wall-clock as the operator feels it
    (process start included), and beside them ``fleetctl --help`` (no database) under the same
    load: what the machine's CPU alone costs a start. With ``api_env`` every read also runs
    through the management API (``FLEET_API_URL``: the server answers it, the client imports no
    database code). The reads run at normal priority even when the simulated devices are niced
    (``--sim-nice``). A read that exits non-zero (``database is locked``) is a failure."""

    READS = (("rollout", "status", "{rid}", "--json"), ("device", "list", "--json"),
             ("rollout", "list", "--json"), ("--help",))

    def __init__(self, lab: Lab, rollout_id: int, api_env: dict[str, str] | None = None) -> None:
        self.lab, self.rid, self.api_env = lab, rollout_id, api_env
        self.times: dict[str, list[float]] = {"local": [], "api": [], "help": []}
        self.by_read: dict[str, float] = {}
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cli-reads", daemon=True)
        self._thread.start()

    def _one(self, args: list[str], env: dict[str, str], kind: str) -> None:
        import subprocess

        from tests.harness.fleetlab import BIN

        t = time.monotonic()
        res = subprocess.run([str(BIN / "fleetctl"), *args], env=env, text=True,
                             capture_output=True, timeout=300, preexec_fn=_normal_priority)
        took = time.monotonic() - t
        self.times[kind].append(took)
        key = f"{kind} {' '.join(a for a in args if a != str(self.rid))}"
        self.by_read[key] = max(self.by_read.get(key, 0.0), round(took, 3))
        if res.returncode != 0:
            self.failed.append(f"fleetctl {' '.join(args)} ({kind}) exited {res.returncode}: "
                               f"{(res.stderr or res.stdout).strip()[:200]}")

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(0.25):
            args = [a.format(rid=self.rid) for a in self.READS[i % len(self.READS)]]
            i += 1
            if args == ["--help"]:
                self._one(args, self.lab.env, "help")
                continue
            self._one(args, self.lab.env, "local")
            if self.api_env is not None:
                self._one(args, self.api_env, "api")

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(60)
        out: dict[str, Any] = {"fleetctl_reads": len(self.times["local"]),
                               "fleetctl_reads_failed": len(self.failed)}
        for kind, prefix in (("local", "fleetctl_read"), ("api", "fleetctl_api_read"),
                             ("help", "fleetctl_help")):
            t = sorted(self.times[kind])
            if t:
                out[f"{prefix}_p50_s"] = round(t[len(t) // 2], 3)
                out[f"{prefix}_max_s"] = round(t[-1], 3)
        out["fleetctl_read_max_s_by_read"] = dict(sorted(self.by_read.items()))
        return out


def _normal_priority() -> None:
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 0)


def sim_priority(nice: int) -> int:
    """Run the simulated devices (this thread, and threads it starts) at ``nice``: they stand
    for devices elsewhere, not for work of the server's machine. Returns the niceness in effect
    (raising it back needs root, which the bench machine has)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    return os.getpriority(os.PRIO_PROCESS, 0)


# -- the store ----------------------------------------------------------------------------------
def setup(root: Path, db_url: str, model: Path, prefix: str,
          mqtt_url: str | None = None) -> tuple[Lab, Store]:
    """A lab with a fresh database and catalog; its own Mosquitto unless ``mqtt_url`` names one."""
    lab = Lab(root, mqtt_url=mqtt_url, db_url=db_url)
    if mqtt_url is None:
        lab.start_broker()
    lab.env["FLEET_TOPIC_PREFIX"] = prefix
    home = Path(lab.env["FLEET_HOME"])
    upgrade(db_url)
    SigningKey.generate().save(home / "keys" / "signing.key", home / "keys" / "signing.pub")
    store = Store(db_url)
    with store.session() as s:
        catalog.add_model_version(s, BlobStore(home / "blobs"), MODEL, "v1", model)
        fleet.create_group(s, "all", {"hw": "cam"})
    return lab, store


def rollout(store: Store, **policy: Any) -> int:
    with store.session() as s:
        return create_rollout(s, f"{MODEL}:v1", "all", "bench", policy=RolloutPolicy(**policy)).id


def status(store: Store, rid: int) -> dict:
    with store.read() as s:
        return rollout_json(s, get_rollout(s, rid), with_targets=False)


def rollout_state(store: Store, rid: int) -> str:
    with store.read() as s:
        return s.get(Rollout, rid).state


def target_counts(store: Store, rid: int, target_sha: str) -> tuple[Counter[str], int]:
    """Targets by state, and how many are healthy on ``target_sha``."""
    from sqlalchemy import func, select

    with store.read() as s:
        rows = s.execute(select(RolloutTarget.state, RolloutTarget.target_sha256, func.count())
                         .where(RolloutTarget.rollout_id == rid)
                         .group_by(RolloutTarget.state, RolloutTarget.target_sha256)).all()
    by_state: Counter[str] = Counter()
    on_target = 0
    for state, sha, count in rows:
        by_state[state] += count
        if state == "healthy" and sha == target_sha:
            on_target += count
    return by_state, on_target


def settled(by_state: Counter[str], state: str) -> bool:
    """Nothing left to happen: no target in flight, and none pending unless the rollout runs."""
    if state in ROLLOUT_FINAL:
        return True
    if any(by_state[s] for s in IN_FLIGHT):
        return False
    return not by_state["pending"] or state != "running"


def artifact_bytes(store: Store, rid: int) -> int:
    """What one device downloads in this rollout (full models ship zstd-compressed)."""
    from sqlalchemy import func, select

    with store.read() as s:
        return int(s.scalar(select(func.max(RolloutTarget.bytes_to_send))
                            .where(RolloutTarget.rollout_id == rid)) or 0)


def store_count(store: Store) -> int:
    from sqlalchemy import func, select

    with store.read() as s:
        return int(s.scalar(select(func.count()).select_from(Device)) or 0)


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


def broker_pid(lab: Lab) -> int:
    return lab.procs["broker"].pid


def host_port(mqtt_url: str) -> tuple[str, int]:
    return "127.0.0.1", int(mqtt_url.rsplit(":", 1)[1])


def check_devices(devices: list[SimDevice], target_sha: str, rid: int | None) -> list[str]:
    """Devices whose own state is not: running ``target_sha``, a healthy report for the rollout."""
    bad = []
    for d in devices:
        cur = d.models.get(MODEL)
        healthy = any(e.state == "healthy" and (rid is None or e.rollout_id == rid)
                      for e in d.events)
        if cur is None or cur.sha256 != target_sha or not healthy:
            bad.append(d.device_id)
    return bad


def verdict(result: dict, n: int, by_state: Counter[str], on_target: int,
            off_devices: list[str]) -> None:
    """Fill ``ok`` and ``failures`` of a fan-out result from both counts."""
    failures = result.setdefault("failures", [])
    result["targets_by_state"] = dict(by_state)
    result["targets_healthy_on_target_in_store"] = on_target
    result["devices_running_target"] = n - len(off_devices)
    if on_target != n:
        failures.append(f"store: {on_target} of {n} targets healthy on the target sha256 "
                        f"({dict(by_state)})")
    if off_devices:
        failures.append(f"devices: {len(off_devices)} of {n} not running the target with a "
                        f"healthy report (first: {', '.join(off_devices[:5])})")
    result["ok"] = not failures


# -- asyncio MQTT -------------------------------------------------------------------------------
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


def _publish(topic: str, payload: bytes, retain: bool = False, mid: int = 0) -> bytes:
    """QoS 0, or QoS 1 with packet id ``mid`` when it is not 0."""
    flags = (1 if retain else 0) | (0x02 if mid else 0)
    pid = struct.pack("!H", mid) if mid else b""
    return _packet(0x30 | flags, _str(topic) + pid + payload)


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
    unsubscribe, publish (QoS 1 like the agent, or 0), receive QoS 0/1 publishes (acknowledged).
    Writes are buffered at once (the caller drains); ``receive`` must not be cancelled mid-packet,
    so one task per connection reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._mid = 0

    @classmethod
    async def connect(cls, host: str, port: int, client_id: str, will_topic: str,
                      will: bytes) -> AsyncMqtt:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        writer.write(_connect(client_id, will_topic, will, 0))
        await writer.drain()
        ack = await reader.readexactly(4)
        if ack[3] != 0:
            raise ConnectionError(f"{client_id}: CONNACK {ack[3]}")
        return cls(reader, writer)

    def _next_mid(self) -> int:
        self._mid = self._mid % 65535 + 1
        return self._mid

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.writer.write(_packet(0x82, struct.pack("!H", self._next_mid()) + _str(topic)
                                  + bytes([qos])))

    def unsubscribe(self, topic: str) -> None:
        self.writer.write(_packet(0xA2, struct.pack("!H", self._next_mid()) + _str(topic)))

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.writer.write(_publish(topic, payload, retain, self._next_mid() if qos else 0))

    async def receive(self) -> tuple[str, bytes] | None:
        """The next PUBLISH (other packets are consumed); None when the connection closes."""
        while True:
            try:
                head = await self.reader.readexactly(1)
                length, mult = 0, 1
                while True:
                    b = (await self.reader.readexactly(1))[0]
                    length += (b & 0x7F) * mult
                    mult *= 128
                    if not b & 0x80:
                        break
                body = await self.reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            if head[0] >> 4 != 3:
                continue  # SUBACK, UNSUBACK, PUBACK, PINGRESP
            qos = (head[0] >> 1) & 3
            tlen = struct.unpack("!H", body[:2])[0]
            topic = body[2:2 + tlen].decode()
            pos = 2 + tlen
            if qos:
                self.writer.write(b"\x40\x02" + body[pos:pos + 2])  # PUBACK
                pos += 2
            return topic, body[pos:]


class AsyncLink:
    """What ``SimDevice`` uses of its MQTT client (subscribe, unsubscribe, publish, connected,
    stop), over one ``AsyncMqtt`` connection."""

    def __init__(self, mqtt: AsyncMqtt) -> None:
        self.mqtt = mqtt
        self.connected = threading.Event()
        self.connected.set()

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.mqtt.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        self.mqtt.unsubscribe(topic_filter)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        if self.connected.is_set():
            self.mqtt.publish(topic, payload, qos=qos, retain=retain)

    def stop(self) -> None:
        if self.connected.is_set():
            self.connected.clear()
            self.mqtt.writer.write(b"\xe0\x00")  # DISCONNECT
            self.mqtt.writer.close()


class AsyncSimDevice(SimDevice):
    """A fleetsim device (the agent's ``UpdateMachine``, fleetsim's simulated effects) whose
    MQTT is a task in one asyncio loop instead of a paho client and a thread. ``pool`` interns
    identical chunk payloads across devices: each device verifies the bytes it received, then
    keeps the fleet's one copy of them; installed models share ``SimFleet.model_cache``."""

    def __init__(self, fleet: SimFleet, device_id: str, labels: dict[str, str],
                 pool: dict[tuple[str, int], bytes]) -> None:
        super().__init__(fleet, device_id, labels, {})
        self.pool = pool

    def connect(self) -> None:
        raise NotImplementedError("AsyncSimDevice connects in run()")

    async def run(self, host: str, port: int, stop: asyncio.Event) -> None:
        t = self.fleet.topics
        mqtt = await AsyncMqtt.connect(host, port, f"fo-{self.device_id}",
                                       t.status(self.device_id),
                                       encode(Status(self.device_id, False)))
        self.client = AsyncLink(mqtt)  # type: ignore[assignment]
        self.client.subscribe(t.desired_filter(self.device_id))
        self.client.subscribe(t.server_status())
        self._handle(CONNECTED, b"")
        try:
            while not stop.is_set():
                await mqtt.writer.drain()
                msg = await mqtt.receive()
                if msg is None:
                    return
                self._handle(*msg)
                self.feed(mc.Tick(time.monotonic(), True))
        finally:
            self.client.stop()

    def tick(self) -> None:
        if self.online:
            self.feed(mc.Tick(time.monotonic(), True))

    def _on_chunk(self, sha: str, index: int, data: bytes) -> None:
        kept = self.pool.get((sha, index))
        if kept is None:
            self.pool[(sha, index)] = data
        elif kept == data:
            data = kept
        super()._on_chunk(sha, index, data)

    def _do(self, e: Any) -> Any:
        out = super()._do(e)
        if isinstance(e, mc.SwapIn):
            cur = self.models[e.model]
            cur.data = self.fleet.model_cache.get(cur.sha256, cur.data)
        return out


async def _ticker(devices: list[AsyncSimDevice], stop: asyncio.Event) -> None:
    """The machines' clock (chunk retries, download timeouts) for devices that hear nothing."""
    while not stop.is_set():
        await asyncio.sleep(0.5)
        for d in devices:
            d.tick()


def bench_fanout(tmp: Path, model: Path, n: int, opts: argparse.Namespace) -> dict:
    """One rollout to N asyncio ``AsyncSimDevice``s in this process."""
    prefix = f"a{uuid.uuid4().hex[:6]}/v1"
    lab, store = setup(tmp / f"fanout-{n}", f"sqlite:///{tmp}/fanout-{n}.db", model, prefix)
    host, port = host_port(lab.mqtt_url)
    target_sha = sha256_file(model)
    sim = SimFleet(lab.mqtt_url, Path(lab.env["FLEET_HOME"]) / "keys" / "signing.pub",
                   prefix=prefix)
    sim.install_from_cache = False  # every device downloads
    pool: dict[tuple[str, int], bytes] = {}
    devices = [AsyncSimDevice(sim, f"cam-{i:05d}", {"hw": "cam"}, pool) for i in range(n)]
    for d in devices[:opts.fail_devices]:
        d.knobs.fail_apply = True
    sim.devices = {d.device_id: d for d in devices}
    result: dict[str, Any] = {
        "devices": n, "failing_on_purpose": min(opts.fail_devices, n),
        "simulator": "AsyncSimDevice: fleetsim's UpdateMachine driver, asyncio MQTT, one process",
        "failures": []}
    observer, published = count_chunk_publishes(lab.mqtt_url, prefix)
    watches = None
    try:
        api_port = free_port()
        lab.env["FLEET_API_LISTEN"] = f"127.0.0.1:{api_port}"
        server = lab.start_server()
        wait_for(lambda: "connected" in lab.log("server"), 30, "server connected")
        token = json.loads(lab.fleetctl("token", "create", "bench", "--role", "viewer",
                                        "--json").stdout)["token"]
        api_env = {**lab.env, "FLEET_API_URL": f"http://127.0.0.1:{api_port}",
                   "FLEET_API_TOKEN": token}
        watches = Watches(server.pid, broker_pid(lab))
        result["simulator_nice"] = sim_priority(opts.sim_nice)

        async def main() -> None:
            stop = asyncio.Event()
            tasks = []
            t_connect = time.monotonic()
            for i, d in enumerate(devices):
                tasks.append(asyncio.create_task(d.run(host, port, stop)))
                if i % 200 == 199:
                    await asyncio.sleep(0.05)  # connect in bursts, as a fleet reconnects
            ticker = asyncio.create_task(_ticker(devices, stop))
            try:
                await run_rollout(tasks, t_connect)
            finally:
                stop.set()
                for d in devices:
                    if d.client is not None:
                        d.client.stop()
                ticker.cancel()
                await asyncio.gather(*tasks, ticker, return_exceptions=True)

        async def run_rollout(tasks: list[asyncio.Task], t_connect: float) -> None:
            deadline = t_connect + opts.timeout_s
            while (registered := await asyncio.to_thread(store_count, store)) < n:
                if time.monotonic() > deadline or all(t.done() for t in tasks):
                    result["failures"].append(f"only {registered} of {n} devices registered")
                    errors = [repr(t.exception()) for t in tasks if t.done() and t.exception()]
                    if errors:
                        result["failures"].append(f"{len(errors)} connections failed: {errors[0]}")
                    return
                await asyncio.sleep(0.5)
            result["s_until_all_registered"] = round(time.monotonic() - t_connect, 1)
            watches.mark()
            t0 = time.monotonic()
            rid = await asyncio.to_thread(rollout, store, health_window_s=0,
                                          state_timeout_s=int(opts.timeout_s),
                                          max_attempts=opts.max_attempts)
            result["rollout_id"] = rid
            reads = (CliReads(lab, rid, api_env if opts.api_reads else None)
                     if opts.cli_reads else None)
            deadline = t0 + opts.timeout_s
            while True:
                by_state, on_target = await asyncio.to_thread(target_counts, store, rid,
                                                              target_sha)
                state = await asyncio.to_thread(rollout_state, store, rid)
                if on_target == n and "s_to_all_healthy_in_store" not in result:
                    result["s_to_all_healthy_in_store"] = round(time.monotonic() - t0, 2)
                if on_target == n and state == "completed":
                    break
                if settled(by_state, state) and on_target < n:
                    break
                if time.monotonic() > deadline:
                    result["failures"].append(f"timed out after {opts.timeout_s:.0f} s")
                    break
                await asyncio.sleep(0.5)
            result["s_to_rollout_settled"] = round(time.monotonic() - t0, 2)
            result["rollout_state"] = state
            if reads is not None:
                result.update(await asyncio.to_thread(reads.stop))
                result["failures"] += reads.failed[:3]
            result.update(watches.figures(n))
            healthy_at = [at for d in devices for st, at in d.timeline if st == "healthy"]
            if len(healthy_at) >= n:
                result["s_to_all_healthy"] = round(max(healthy_at) - t0, 2)
            await asyncio.sleep(1.0)  # the observer's last chunks
            verdict(result, n, by_state, on_target, check_devices(devices, target_sha, rid))

        try:
            asyncio.run(main())
        finally:
            sim_priority(0)
        if "rollout_id" in result:
            size = artifact_bytes(store, result["rollout_id"])
            result.update(artifact_bytes=size, model_bytes=model.stat().st_size,
                          bytes_published=published["bytes"], chunk_publishes=published["msgs"],
                          published_over_artifact=round(published["bytes"] / size, 3)
                          if size else None, unicast_would_be=n)
        result["ok"] = not result["failures"]
        return result
    finally:
        if watches is not None:
            watches.stop()
        observer.stop()
        sim.close()
        lab.close()
        store.dispose()


# -- SimFleet in processes (cross-check) --------------------------------------------------------
def _sim_shard(mqtt_url: str, key: str, prefix: str, ids: list[str], fail: int, ready: Any,
               stop: Any, results: Any) -> None:
    """One process of simulated devices (spawned); on stop, sends {device id: sha256 running,
    rollout ids it reported healthy for}."""
    fleet = SimFleet(mqtt_url, Path(key), prefix=prefix)
    fleet.install_from_cache = False
    for i, device_id in enumerate(ids):
        fleet.add(device_id, {"hw": "cam"}).knobs.fail_apply = i < fail
    fleet.wait_connected(300)
    ready.put(len(ids))
    stop.wait()
    results.put({d.device_id: ((m.sha256 if (m := d.models.get(MODEL)) else None),
                               sorted({e.rollout_id for e in d.events if e.state == "healthy"
                                       and e.rollout_id is not None}))
                 for d in fleet.devices.values()})
    fleet.close()


def bench_fanout_threads(tmp: Path, model: Path, n: int, opts: argparse.Namespace) -> dict:
    import multiprocessing as mp

    prefix = f"b{uuid.uuid4().hex[:6]}/v1"
    lab, store = setup(tmp / f"fanout-threads-{n}", f"sqlite:///{tmp}/fanout-threads-{n}.db",
                       model, prefix)
    target_sha = sha256_file(model)
    observer, published = count_chunk_publishes(lab.mqtt_url, prefix)
    result: dict[str, Any] = {"devices": n, "failing_on_purpose": min(opts.fail_devices, n),
                              "simulator": f"SimFleet, {SHARD} devices per process",
                              "failures": []}
    ctx = mp.get_context("spawn")
    ready, stop, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    ids = [f"cam-{i:05d}" for i in range(n)]
    key = str(Path(lab.env["FLEET_HOME"]) / "keys" / "signing.pub")
    procs = [ctx.Process(target=_sim_shard, daemon=True,
                         args=(lab.mqtt_url, key, prefix, ids[i:i + SHARD],
                               max(0, opts.fail_devices - i), ready, stop, results))
             for i in range(0, n, SHARD)]
    watches = None
    try:
        server = lab.start_server()
        watches = Watches(server.pid, broker_pid(lab))
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=600)
        wait_for(lambda: store_count(store) >= n, 120, "devices registered", 0.5)
        watches.mark()
        t0 = time.monotonic()
        rid = rollout(store, health_window_s=0, state_timeout_s=int(opts.timeout_s),
                      max_attempts=opts.max_attempts)

        def finished() -> bool:
            by_state, on_target = target_counts(store, rid, target_sha)
            state = rollout_state(store, rid)
            return (on_target == n and state == "completed") or (
                settled(by_state, state) and on_target < n)

        try:
            wait_for(finished, opts.timeout_s, "rollout settled", 0.5)
        except TimeoutError as e:
            result["failures"].append(str(e))
        result["s_to_rollout_settled"] = round(time.monotonic() - t0, 1)
        result.update(watches.figures(n))
        time.sleep(1.0)
        by_state, on_target = target_counts(store, rid, target_sha)
        stop.set()
        seen: dict[str, tuple[str | None, list[int]]] = {}
        for _ in procs:
            seen.update(results.get(timeout=60))
        off = [d for d in ids if d not in seen or seen[d][0] != target_sha or rid not in seen[d][1]]
        failures = result["failures"]
        verdict(result, n, by_state, on_target, off)
        result["failures"] = failures + [f for f in result["failures"] if f not in failures]
        size = artifact_bytes(store, rid)
        result.update(artifact_bytes=size, bytes_published=published["bytes"],
                      chunk_publishes=published["msgs"],
                      published_over_artifact=round(published["bytes"] / size, 3) if size else None)
        result["ok"] = not result["failures"]
        return result
    finally:
        stop.set()
        for p in procs:
            p.join(30)
        if watches is not None:
            watches.stop()
        observer.stop()
        lab.close()
        store.dispose()


# -- heartbeats ---------------------------------------------------------------------------------
def bench_heartbeats(tmp: Path, model: Path, n: int, steady_s: float,
                     opts: argparse.Namespace) -> dict:
    prefix = f"h{uuid.uuid4().hex[:6]}/v1"
    lab, store = setup(tmp / f"hb-{n}", f"sqlite:///{tmp}/hb-{n}.db", model, prefix)
    host, port = host_port(lab.mqtt_url)
    result: dict[str, Any] = {"devices": n, "heartbeat_interval_s": 30, "failures": []}
    watches = None
    try:
        server = lab.start_server()
        wait_for(lambda: "connected" in lab.log("server"), 30, "server connected")
        watches = Watches(server.pid, broker_pid(lab))
        result["simulator_nice"] = sim_priority(opts.sim_nice)

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
            while (in_db := await asyncio.to_thread(store_count, store)) < n:
                await asyncio.sleep(0.5)
                if time.monotonic() - t0 > opts.timeout_s:
                    break
            result["connected"] = connected[0]
            result["hellos_in_db"] = in_db
            if connected[0] < n:
                errors = [repr(t.exception()) for t in tasks if t.done() and t.exception()]
                result["failures"].append(f"only {connected[0]} of {n} devices connected"
                                          + (f" ({errors[0]})" if errors else ""))
            if in_db < n:
                result["failures"].append(f"only {in_db} of {n} hellos in the database after "
                                          f"{opts.timeout_s:.0f} s")
            else:
                result["s_until_all_hellos_in_db"] = round(time.monotonic() - t0, 1)
            if not result["failures"]:
                await asyncio.sleep(2)
                watches.mark()
                await asyncio.sleep(steady_s)
                figures = watches.figures(n)
                result["steady_window_s"] = round(time.monotonic() - watches.t0, 1)
                result["server_cpu_share_of_one_core_pct"] = round(
                    100 * figures["server_cpu_s"] / result["steady_window_s"], 1)
                result["broker_cpu_share_of_one_core_pct"] = round(
                    100 * figures["broker_cpu_s"] / result["steady_window_s"], 1)
                result.update({k: v for k, v in figures.items() if "rss" in k})
                still = connected[0] - sum(1 for t in tasks if t.done())
                if still < n:
                    result["failures"].append(f"{n - still} connections closed in the window")
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(main())
        result["ok"] = not result["failures"]
        return result
    finally:
        if watches is not None:
            watches.stop()
        lab.close()
        store.dispose()


# -- failover -----------------------------------------------------------------------------------
def bench_failover(tmp: Path, model: Path, n: int, opts: argparse.Namespace) -> dict:
    from sqlalchemy import create_engine, text

    name = f"fleet_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # noqa: BLE001
        return {"skipped": f"PostgreSQL not available: {str(e).splitlines()[0]}", "ok": True}
    db_url = PG_URL.rsplit("/", 1)[0] + f"/{name}"
    prefix = f"f{uuid.uuid4().hex[:6]}/v1"
    lab, store = setup(tmp / "fo", db_url, model, prefix)
    lab.env["FLEET_SHARE_GROUP"] = secrets.token_urlsafe(18)  # a secret, not a name
    sim = SimFleet(lab.mqtt_url, Path(lab.env["FLEET_HOME"]) / "keys" / "signing.pub",
                   prefix=prefix)
    sim.install_from_cache = False
    target_sha = sha256_file(model)
    result: dict[str, Any] = {"devices": n, "failures": []}
    try:
        a = lab.start_server("server-a")
        lab.start_server("server-b")
        for i in range(n):
            sim.add(f"fo-{i:04d}", {"hw": "cam"})
        sim.wait_connected(60)
        wait_for(lambda: store_count(store) >= n, 60, "devices registered")
        rid = rollout(store, canary="5%", waves=(50.0, 100.0), health_window_s=2)
        wait_for(lambda: status(store, rid)["current_wave"] >= 1, 120, "wave 2 opened")
        with store.session() as s:
            owner = s.get(Rollout, rid).lease_owner
        pid = int(owner.split(":")[1])
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        try:
            wait_for(lambda: status(store, rid)["state"] == "completed", 300, "rollout completed")
        except TimeoutError as e:
            result["failures"].append(str(e))
        took = time.monotonic() - t0
        time.sleep(1.0)
        by_state, on_target = target_counts(store, rid, target_sha)
        twice = sum(1 for d in sim.devices.values() if len(d.manifests) > 1)
        result.update(killed="server-a" if pid == a.pid else "server-b",
                      s_from_kill_to_completed=round(took, 1), devices_updated_twice=twice)
        failures = list(result["failures"])
        verdict(result, n, by_state, on_target,
                check_devices(list(sim.devices.values()), target_sha, rid))
        result["failures"] = failures + [f for f in result["failures"] if f not in failures]
        result["ok"] = not result["failures"]
        return result
    finally:
        sim.close()
        lab.close()
        store.dispose()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# -- targets ------------------------------------------------------------------------------------
def load_targets(path: Path) -> dict:
    try:
        return json.loads(path.read_text()).get("fleet_scale", {})
    except (OSError, ValueError) as e:
        return {"error": f"cannot read {path}: {e}"}


def check_targets(targets: dict, out: dict) -> dict:
    """Each target: measured, pass (True / False / None when this run cannot say)."""
    checks: list[dict[str, Any]] = []
    series = [r for r in out.get("fanout", []) if r.get("ok")]
    limit = targets.get("published_over_artifact_max")
    if limit is not None:
        for r in out.get("fanout", []):
            m = r.get("published_over_artifact")
            checks.append({"name": f"published_over_artifact at {r['devices']}",
                           "target": f"<= {limit}", "measured": m,
                           "pass": None if m is None or not r.get("ok") else m <= limit})
    tol = targets.get("series_growth_tolerance")
    if tol is not None:
        cpu = sorted((r["devices"], r["server_cpu_s_per_device"]) for r in series)
        took = sorted((r["devices"], r["s_to_all_healthy"] / r["devices"]) for r in series
                      if r.get("s_to_all_healthy") is not None)
        for name, per in (("server CPU-s per device flat or falling", cpu),
                          ("time to all healthy per device flat or falling", took)):
            checks.append({"name": name,
                           "target": f"every size <= the smallest size's x {1 + tol}",
                           "measured": {str(d): round(v, 5) for d, v in per},
                           "pass": None if len(per) < 2 else all(
                               v <= per[0][1] * (1 + tol) for _, v in per[1:])})
    limit = targets.get("fleetctl_read_s_max")
    if limit is not None:
        for r in out.get("fanout", []):
            for key, how in (("fleetctl_read_max_s", "on the store"),
                             ("fleetctl_api_read_max_s", "through the API")):
                m = r.get(key)
                checks.append({"name": f"slowest fleetctl read {how} during the rollout at "
                                       f"{r['devices']}", "target": f"<= {limit} s",
                               "measured": m,
                               "pass": None if m is None or not r.get("ok") else m <= limit})
    hb = out.get("heartbeats")
    limit = targets.get("heartbeat_cpu_pct_max")
    if hb and limit is not None:
        at = targets.get("heartbeat_devices", 10_000)
        m = hb.get("server_cpu_share_of_one_core_pct")
        checks.append({"name": f"heartbeats: server % of one core at {at} devices",
                       "target": f"<= {limit}", "measured": m, "measured_at": hb.get("devices"),
                       "pass": None if m is None or hb.get("devices", 0) < at else m <= limit})
    decided = [c["pass"] for c in checks if c["pass"] is not None]
    return {"checks": checks, "all_met": all(decided) if decided else None,
            "undecided": sum(1 for c in checks if c["pass"] is None)}


# -- main ---------------------------------------------------------------------------------------
def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.fleet_scale",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default=_env("BENCH_DEVICES", "100" if QUICK else "1000"),
                   help="fan-out fleet sizes, comma-separated: one run each (BENCH_DEVICES)")
    p.add_argument("--heartbeat-devices", type=int, default=int(_env(
        "BENCH_HEARTBEAT_DEVICES", "500" if QUICK else "10000")))
    p.add_argument("--heartbeat-steady-s", type=float, default=float(_env(
        "BENCH_HEARTBEAT_STEADY_S", "10" if QUICK else "60")))
    p.add_argument("--failover-devices", type=int, default=int(_env(
        "BENCH_FAILOVER_DEVICES", "20" if QUICK else "100")))
    p.add_argument("--artifact-mb", type=float, default=float(_env("BENCH_ARTIFACT_MB", "1")),
                   help="size of the model the fan-out rolls out, MiB (BENCH_ARTIFACT_MB)")
    p.add_argument("--fail-devices", type=int, default=int(_env("BENCH_FAIL_DEVICES", "0")),
                   help="make the first K fan-out devices fail their apply (proves the bench "
                        "fails)")
    p.add_argument("--max-attempts", type=int, default=1,
                   help="rollout --max-attempts (1: a device failure is final, not retried)")
    p.add_argument("--timeout-s", type=float, default=900.0, help="per run")
    p.add_argument("--no-cli-reads", dest="cli_reads", action="store_false",
                   help="do not run fleetctl reads beside the fan-out")
    p.add_argument("--api-reads", action="store_true",
                   help="also run each read through the management API (the server answers "
                        "them: its CPU figures then include that)")
    p.add_argument("--sim-nice", type=int, default=int(_env("BENCH_SIM_NICE", "10")),
                   help="niceness of the simulated devices (0: compete with the server)")
    p.add_argument("--only", default=_env("BENCH_ONLY", "fanout,heartbeats,failover"),
                   help="runs, comma-separated: fanout, fanout_threads, heartbeats, failover")
    p.add_argument("--targets", type=Path, default=HERE / "targets.json")
    opts = p.parse_args(argv)
    opts.device_counts = [int(x) for x in str(opts.devices).split(",") if x.strip()]
    opts.runs = [x.strip() for x in opts.only.split(",") if x.strip()]
    unknown = set(opts.runs) - {"fanout", "fanout_threads", "heartbeats", "failover"}
    if unknown:
        p.error(f"unknown runs: {', '.join(sorted(unknown))}")
    return opts


def guarded(run: Any, what: dict) -> dict:
    """A run that raised is a failed run with its error, not a crashed benchmark."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - reported in the JSON
        return {**what, "ok": False, "failures": [f"{type(e).__name__}: {e}"],
                "traceback": traceback.format_exc()[-2000:]}


def main(argv: list[str] | None = None) -> int:
    from tests.harness.modelgen import make_onnx_model

    opts = parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out: dict[str, Any] = {
        "machine": {"cores": os.cpu_count(),
                    "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "open_files_limit": hard, "loadavg_1m_at_start": round(os.getloadavg()[0], 2)},
        "config": {"quick": QUICK, "devices": opts.device_counts,
                   "heartbeat_devices": opts.heartbeat_devices,
                   "heartbeat_steady_s": opts.heartbeat_steady_s,
                   "failover_devices": opts.failover_devices, "artifact_mb": opts.artifact_mb,
                   "fail_devices": opts.fail_devices, "max_attempts": opts.max_attempts,
                   "runs": opts.runs, "argv": sys.argv[1:]},
    }
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp_s:
        tmp = Path(tmp_s)
        model = make_onnx_model(tmp / "m.onnx", size_mb=opts.artifact_mb)
        if "fanout" in opts.runs:
            out["fanout"] = [guarded(lambda n=n: bench_fanout(tmp, model, n, opts), {"devices": n})
                             for n in opts.device_counts]
        if "fanout_threads" in opts.runs:
            out["fanout_threads"] = [
                guarded(lambda n=n: bench_fanout_threads(tmp, model, n, opts), {"devices": n})
                for n in opts.device_counts]
        if "heartbeats" in opts.runs:
            n = opts.heartbeat_devices
            out["heartbeats"] = guarded(lambda: bench_heartbeats(
                tmp, model, n, opts.heartbeat_steady_s, opts), {"devices": n})
        if "failover" in opts.runs:
            n = opts.failover_devices
            out["failover"] = guarded(lambda: bench_failover(tmp, model, n, opts),
                                      {"devices": n})
    failures = []
    for name in ("fanout", "fanout_threads", "heartbeats", "failover"):
        runs = out.get(name)
        for r in runs if isinstance(runs, list) else [runs] if runs else []:
            failures += [f"{name} {r.get('devices')}: {f}" for f in r.get("failures", [])]
            if not r.get("ok") and not r.get("failures"):
                failures.append(f"{name} {r.get('devices')}: not ok")
    out["targets"] = {"file": str(opts.targets), "targets": load_targets(opts.targets)}
    out["targets"].update(check_targets(out["targets"]["targets"], out))
    out["ok"] = not failures
    out["failures"] = failures
    print(json.dumps(out, indent=2))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
