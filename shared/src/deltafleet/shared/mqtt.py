"""The one class that owns a paho-mqtt client (callback API v2).

Rules (after Home Assistant's MQTT client):
- subscriptions are tracked and replayed on every CONNACK, so a reconnect loses nothing;
- callbacks never block paho's network thread: messages and connection changes go into
  ``inbox`` and the owner consumes them on its own thread;
- a last will is always set; auth refusal is final (no reconnect storm);
- MQTT 5 is used where the broker offers it, 3.1.1 otherwise (protocol="auto");
- why an attempt failed (refused, name not found, TLS, auth ...) is classified by
  ``connection.classify_error`` / ``classify_connack`` and logged once per change of cause with
  the backoff in use (``connection.ConnectionTracker``); ``state()`` is the current
  ``ConnectionState`` and ``wait_connected`` names the cause when it gives up.

Inbox items are ``(topic, payload)``; connection changes arrive as ``(CONNECTED, b"")`` and
``(DISCONNECTED, b"")``.

Backpressure (``max_unacked`` set): QoS 1 messages are acknowledged only when the owner calls
``processed()`` for them, after it has acted on them (e.g. committed a batch). The broker sends
at most ``max_unacked`` unacknowledged messages (MQTT 5 Receive Maximum; Mosquitto's
``max_inflight_messages`` on 3.1.1), so the inbox cannot grow without bound and paho's thread
never blocks.
"""

from __future__ import annotations

import collections
import logging
import queue
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .connection import (
    Cause,
    ConnectionState,
    ConnectionTracker,
    Failure,
    classify_connack,
    classify_error,
)
from .errors import DeltafleetError

log = logging.getLogger(__name__)

CONNECTED = "$connected"
DISCONNECTED = "$disconnected"
__all__ = ["CONNECTED", "DISCONNECTED", "Cause", "ConnectionState", "Failure", "MqttClient",
           "MqttSettings", "TransportError", "Will"]


class TransportError(DeltafleetError):
    """The broker could not be reached, refused us, or did not acknowledge in time."""


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1


@dataclass(frozen=True, slots=True)
class MqttSettings:
    url: str  # mqtt://host:port or mqtts://host:port
    client_id: str
    keepalive_s: int = 30
    protocol: str = "auto"  # "auto" | "5" | "3.1.1"
    will: Will | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 10.0
    max_unacked: int | None = None  # manual acks + Receive Maximum (see module doc)
    # Persistent session: the broker keeps our subscriptions and queues QoS 1 messages while we
    # are away (needs a stable client_id). None = clean session.
    session_expiry_s: int | None = None

    def endpoint(self) -> tuple[str, int, bool]:
        u = urlparse(self.url)
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise TransportError(f"broker URL {self.url!r} must start with mqtt:// or mqtts://")
        tls = u.scheme in ("mqtts", "ssl")
        return u.hostname or "127.0.0.1", u.port or (8883 if tls else 1883), tls


class _PahoClient(paho.Client):
    """paho's client, telling its owner what a connection attempt raised (paho's loop
    swallows the exception and retries)."""

    on_attempt: Any = None
    on_attempt_error: Any = None

    def reconnect(self) -> paho.MQTTErrorCode:
        if self.on_attempt is not None:
            self.on_attempt()
        try:
            return super().reconnect()
        except (OSError, ValueError) as e:
            if self.on_attempt_error is not None:
                self.on_attempt_error(e)
            raise


class MqttClient:
    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connected = threading.Event()
        self.protocol_in_use = "5" if settings.protocol in ("auto", "5") else "3.1.1"
        self.fatal: str | None = None
        self.session_present = False  # the last CONNACK's flag: the broker kept our session
        self._subs: dict[str, int] = {}
        self._lock = threading.Lock()
        self._acks: collections.deque[tuple[int, int] | None] = collections.deque()
        self._ever_connected = False
        self._stopped = False
        host, port, _ = settings.endpoint()
        self._min_delay_s = max(1, int(settings.reconnect_min_s))
        self._tracker = ConnectionTracker(settings.url, f"{host}:{port}", self._min_delay_s,
                                          int(settings.reconnect_max_s))
        self._attempt_failed = False
        self._client = self._make_client()

    # -- lifecycle -------------------------------------------------------------------------
    def _make_client(self) -> paho.Client:
        s = self.settings
        v5 = self.protocol_in_use == "5"
        c = _PahoClient(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            # v5 sets clean_start on connect instead
            clean_session=None if v5 else s.session_expiry_s is None,
        )
        if s.username:
            c.username_pw_set(s.username, s.password)
        _, _, tls = s.endpoint()
        if tls:
            c.tls_set(
                ca_certs=s.ca_file, certfile=s.cert_file, keyfile=s.key_file,
                cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if s.will:
            c.will_set(s.will.topic, s.will.payload, qos=s.will.qos, retain=s.will.retain)
        c.reconnect_delay_set(min_delay=self._min_delay_s, max_delay=int(s.reconnect_max_s))
        c.max_inflight_messages_set(64)
        if s.max_unacked:
            c.manual_ack_set(True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_attempt = self._on_attempt
        c.on_attempt_error = self._on_attempt_error
        return c

    def start(self) -> None:
        host, port, _ = self.settings.endpoint()
        try:
            if self.protocol_in_use == "5":
                props = Properties(PacketTypes.CONNECT)
                if self.settings.max_unacked:
                    props.ReceiveMaximum = self.settings.max_unacked
                if self.settings.session_expiry_s:
                    props.SessionExpiryInterval = self.settings.session_expiry_s
                self._client.connect_async(host, port, self.settings.keepalive_s,
                                           clean_start=self.settings.session_expiry_s is None,
                                           properties=props)
            else:
                self._client.connect_async(host, port, self.settings.keepalive_s)
        except (OSError, ValueError) as e:
            raise TransportError(f"cannot connect to {self.settings.url}: {e}") from e
        self._client.loop_start()

    def wait_connected(self, timeout_s: float) -> None:
        if not self.connected.wait(timeout_s):
            raise TransportError(self.fatal or self._not_connected_why(timeout_s))

    def _not_connected_why(self, timeout_s: float) -> str:
        st = self.state()
        url = self.settings.url
        if st.failure is None:
            return f"broker {url} did not answer within {timeout_s:.0f} s (no CONNACK)"
        n = st.attempts
        return (f"broker {url} not connected after {timeout_s:.0f} s: {st.failure} "
                f"({n} attempt{'s' if n != 1 else ''})")

    def state(self) -> ConnectionState:
        """The connection as the owner should report it (a frozen snapshot)."""
        with self._lock:
            return self._tracker.state

    def stop(self, *, publish_will_first: bool = False) -> None:
        """Disconnect cleanly. A clean disconnect does not fire the will, so an owner that
        wants its presence marked offline publishes that itself before stopping."""
        self._stopped = True
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()

    # -- subscriptions and publishing -------------------------------------------------------
    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        with self._lock:
            self._subs[topic_filter] = qos
        if self.connected.is_set():
            self._client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            known = self._subs.pop(topic_filter, None)
        if known is not None and self.connected.is_set():
            self._client.unsubscribe(topic_filter)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1,
                retain: bool = False) -> paho.MQTTMessageInfo:
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    def publish_wait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                     timeout_s: float = 10.0) -> None:
        info = self.publish(topic, payload, qos=qos, retain=retain)
        try:
            info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError) as e:
            raise TransportError(f"publish to {topic} failed: {e}") from e
        if not info.is_published():
            raise TransportError(f"publish to {topic} not acknowledged within {timeout_s} s")

    # -- paho callbacks (network thread: never block here) ----------------------------------
    def _record(self, line: tuple[int, str] | None) -> None:
        if line is not None:
            log.log(*line)

    def _failed(self, failure: Failure) -> None:
        """At most one failure per attempt: the broker closing the socket after a refusing
        CONNACK is the same failure."""
        with self._lock:
            if self._attempt_failed or self._stopped:
                return
            self._attempt_failed = True
            line = self._tracker.failed(failure, time.time())
        self._record(line)

    def _on_attempt(self) -> None:
        with self._lock:
            self._attempt_failed = False

    def _on_attempt_error(self, exc: BaseException) -> None:
        self._failed(classify_error(exc))

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        code = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
        if code != 0:
            failure = classify_connack(code, str(reason_code))
            if failure.final:
                self.fatal = f"broker {self.settings.url} refused the connection: {failure}"
                self._failed(failure)
                client.disconnect()
            elif failure.cause is Cause.PROTOCOL and self.settings.protocol == "auto":
                log.debug("broker refused MQTT 5: %s", reason_code)
                threading.Thread(target=self._fall_back_to_311, daemon=True).start()
            else:
                self._failed(failure)
            return
        with self._lock:
            line = self._tracker.connected(time.time())
        self._record(line)
        self._ever_connected = True
        self.session_present = bool(getattr(flags, "session_present", False))
        with self._lock:
            subs = list(self._subs.items())
        if subs:
            client.subscribe(subs)
        self.connected.set()
        with self._lock:
            self._acks.append(None)
            self.inbox.put((CONNECTED, b""))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        with self._lock:  # message ids of a dead connection must never be acked on a new one
            self._acks = collections.deque(None for _ in self._acks)
            if was:
                self._acks.append(None)
                self.inbox.put((DISCONNECTED, b""))
        fallback = (
            not was and not self._ever_connected and not self._stopped and self.fatal is None
            and self.settings.protocol == "auto" and self.protocol_in_use == "5"
        )
        if fallback:
            # Dropped before any CONNACK: an MQTT 3.1.1-only broker closing on a v5 CONNECT.
            threading.Thread(target=self._fall_back_to_311, daemon=True).start()
        elif self._stopped or self.fatal is not None:
            return
        elif was:
            with self._lock:
                line = self._tracker.lost(Failure(Cause.LOST, _disconnect_detail(reason_code)),
                                          time.time())
            self._record(line)
        else:
            self._failed(Failure(Cause.CLOSED, _disconnect_detail(reason_code)))

    def _fall_back_to_311(self) -> None:
        with self._lock:
            if self.protocol_in_use != "5" or self._stopped:
                return
            self.protocol_in_use = "3.1.1"
        log.info("broker does not speak MQTT 5; using 3.1.1")
        old = self._client
        old.loop_stop()
        self._client = self._make_client()
        self.start()

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        with self._lock:
            manual = self.settings.max_unacked and msg.qos
            self._acks.append((msg.mid, msg.qos) if manual else None)
            self.inbox.put((msg.topic, bytes(msg.payload)))

    def processed(self, count: int = 1) -> None:
        """Acknowledge the next ``count`` inbox items the owner has finished with (only needed
        with ``max_unacked``; control items count too). Items are acknowledged in inbox order."""
        if not self.settings.max_unacked:
            return
        with self._lock:
            done = [self._acks.popleft() for _ in range(min(count, len(self._acks)))]
        for item in done:
            if item is not None:
                self._client.ack(*item)


def _disconnect_detail(reason_code: Any) -> str:
    text = str(reason_code)
    return "" if text in ("Unspecified error", "Success", "0") else text
