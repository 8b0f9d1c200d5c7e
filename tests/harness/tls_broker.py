"""A Mosquitto started with the config `fleetctl broker config` generates (TLS, client
certificates, CRL, ACL), on a free loopback port, plus TLS client helpers."""

from __future__ import annotations

import queue
import ssl
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from deltafleet.server import enroll
from deltafleet.server.config import ServerConfig

from .broker import Mosquitto, run_as_root_line
from .fleetlab import free_port

__all__ = ["Peer", "TlsBroker"]


class TlsBroker(Mosquitto):
    """The generated config (TLS, client certificates, CRL, ACL); started by the constructor."""

    scheme = "mqtts"

    def __init__(self, cfg: ServerConfig, workdir: Path) -> None:
        self.cfg = cfg
        port = free_port()
        self.files = enroll.write_broker_config(cfg, workdir, port=port, bind="127.0.0.1",
                                                hosts=["127.0.0.1", "localhost"])
        if root := run_as_root_line():
            with open(self.files.conf, "a") as f:
                f.write(root)
        super().__init__(workdir, port, self.files.conf)
        self.start()


class Peer:
    """A paho client that records what it receives and whether the broker accepted it."""

    def __init__(self, port: int, *, ca: Path | None, cert: Path | None = None,
                 key: Path | None = None, tls: bool = True, client_id: str | None = None,
                 clean_session: bool = True) -> None:
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: queue.Queue[int] = queue.Queue()
        self.subacks: queue.Queue[object] = queue.Queue()
        self.disconnected = threading.Event()  # set when the broker closed an accepted session
        self.session_present: bool | None = None  # from the last CONNACK
        c = paho.Client(CallbackAPIVersion.VERSION2,
                        client_id=client_id or f"peer-{uuid.uuid4().hex[:8]}",
                        protocol=paho.MQTTv311, clean_session=clean_session)
        if tls:
            ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
            if cert is not None:
                ctx.load_cert_chain(str(cert), str(key))
            c.tls_set_context(ctx)
        def on_connect(_c, _u, flags, rc, _p) -> None:
            self.session_present = bool(flags.session_present)
            self.connack.put(rc.value if hasattr(rc, "value") else int(rc))

        def on_disconnect(*_a) -> None:
            self.disconnected.set()
            self.connack.put(-1)  # refused during the handshake

        c.on_connect = on_connect
        c.on_message = lambda _c, _u, m: self.inbox.put((m.topic, m.payload))
        c.on_subscribe = lambda _c, _u, _mid, rcs, _p: self.subacks.put(rcs)
        c.on_disconnect = on_disconnect
        self.client = c
        self.port = port

    def connect(self, timeout_s: float = 5.0) -> bool:
        """True if the broker accepted the connection (CONNACK 0) within ``timeout_s``."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=10)
        except (OSError, ssl.SSLError):
            return False
        self.client.loop_start()
        try:
            return self.connack.get(timeout=timeout_s) == 0
        except queue.Empty:
            return False

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        self.subacks.get(timeout=5)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)

    def received(self, within_s: float) -> list[tuple[str, bytes]]:
        got: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + within_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                got.append(self.inbox.get(timeout=left))
            except queue.Empty:
                break
        return got

    def wait_for(self, topic: str, timeout_s: float = 5.0) -> bytes:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                t, p = self.inbox.get(timeout=left)
            except queue.Empty:
                break
            if t == topic:
                return p
        raise AssertionError(f"nothing on {topic} within {timeout_s} s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

