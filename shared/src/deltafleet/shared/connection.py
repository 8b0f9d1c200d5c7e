"""Why a broker connection fails, and the rule for saying so (pure: no paho, no sockets).

``classify_error`` maps what a connection attempt raised (``OSError``, ``ssl`` errors,
``socket.gaierror``) to a ``Failure``; ``classify_connack`` maps a refusing CONNACK reason code
(MQTT 5 values; the 3.1.1 return codes 1-5 too). ``ConnectionTracker`` holds the connection's
state and decides what is worth a log line:

- a failed attempt is logged only when its cause differs from the previous attempt's (or the
  connection was up before), with the backoff in use; repeats only count ``attempts``;
- a successful connect is logged once, after a failure or at first;
- an auth refusal (bad credentials, not authorised) is final: the owner stops retrying.

The state (``ConnectionState``) is a frozen snapshot: ``connected``, ``since`` (wall-clock time
of the last change between up and down), ``failure`` (the last cause), ``attempts`` (failed
attempts since the last connect) and ``retry_s`` (the delay before the next attempt).
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

__all__ = ["Cause", "ConnectionState", "ConnectionTracker", "Failure", "classify_connack",
           "classify_error"]


class Cause(StrEnum):
    REFUSED = "connection refused"
    NAME_NOT_FOUND = "name not found"
    UNREACHABLE = "network unreachable"
    TIMEOUT = "timed out"
    TLS_VERIFY = "TLS failure: certificate verify failed"
    TLS_HOSTNAME = "TLS failure: hostname mismatch"
    TLS = "TLS failure"
    BAD_CREDENTIALS = "auth refused: bad credentials"
    NOT_AUTHORISED = "auth refused: not authorised"
    PROTOCOL = "protocol version not supported"
    CLIENT_ID = "client id rejected"
    BROKER_UNAVAILABLE = "broker unavailable"
    BROKER_REFUSED = "broker refused the connection"
    CLOSED = "connection closed by the broker"
    LOST = "connection lost"
    OTHER = "connection error"


FINAL_CAUSES = frozenset({Cause.BAD_CREDENTIALS, Cause.NOT_AUTHORISED})

_CONNACK: dict[int, Cause] = {
    1: Cause.PROTOCOL, 0x84: Cause.PROTOCOL,
    2: Cause.CLIENT_ID, 0x85: Cause.CLIENT_ID,
    3: Cause.BROKER_UNAVAILABLE, 0x88: Cause.BROKER_UNAVAILABLE, 0x89: Cause.BROKER_UNAVAILABLE,
    0x97: Cause.BROKER_UNAVAILABLE, 0x9F: Cause.BROKER_UNAVAILABLE,
    4: Cause.BAD_CREDENTIALS, 0x86: Cause.BAD_CREDENTIALS, 0x8C: Cause.BAD_CREDENTIALS,
    5: Cause.NOT_AUTHORISED, 0x87: Cause.NOT_AUTHORISED, 0x8A: Cause.NOT_AUTHORISED,
}
_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
_HOSTNAME_VERIFY_CODE = 62  # X509_V_ERR_HOSTNAME_MISMATCH


@dataclass(frozen=True, slots=True)
class Failure:
    cause: Cause
    detail: str = ""

    @property
    def final(self) -> bool:
        return self.cause in FINAL_CAUSES

    def __str__(self) -> str:
        return f"{self.cause} ({self.detail})" if self.detail else str(self.cause)


def classify_error(exc: BaseException) -> Failure:
    """The cause of an exception raised while opening the connection (TCP, DNS, TLS)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        msg = str(getattr(exc, "verify_message", None) or exc)
        code = getattr(exc, "verify_code", None)
        if code == _HOSTNAME_VERIFY_CODE or "hostname" in msg.lower():
            return Failure(Cause.TLS_HOSTNAME, msg)
        return Failure(Cause.TLS_VERIFY, msg)
    if isinstance(exc, ssl.SSLError):
        return Failure(Cause.TLS, str(exc.reason or exc.strerror or exc).lower())
    if isinstance(exc, socket.gaierror):
        return Failure(Cause.NAME_NOT_FOUND, exc.strerror or "")
    if isinstance(exc, ConnectionRefusedError):
        return Failure(Cause.REFUSED)
    if isinstance(exc, TimeoutError):
        return Failure(Cause.TIMEOUT)
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return Failure(Cause.CLOSED, exc.strerror or "")
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE:
        return Failure(Cause.UNREACHABLE, exc.strerror or "")
    if isinstance(exc, OSError) and exc.strerror:
        return Failure(Cause.OTHER, exc.strerror)
    return Failure(Cause.OTHER, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def classify_connack(code: int, name: str = "") -> Failure:
    """The cause of a CONNACK that refuses us (``code`` != 0)."""
    cause = _CONNACK.get(code, Cause.BROKER_REFUSED)
    return Failure(cause, name if cause is Cause.BROKER_REFUSED else "")


@dataclass(frozen=True, slots=True)
class ConnectionState:
    url: str
    connected: bool = False
    since: float | None = None
    failure: Failure | None = None
    attempts: int = 0
    retry_s: float | None = None
    final: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "connected": self.connected, "since": self.since,
                "cause": self.failure.cause.value if self.failure else None,
                "error": str(self.failure) if self.failure else None,
                "attempts": self.attempts, "retry_s": self.retry_s, "final": self.final}


class ConnectionTracker:
    """The once-per-change rule. Each method takes the event's wall-clock time and returns the
    new state and the line to log (``(level, text)``), or None when nothing changed."""

    def __init__(self, url: str, endpoint: str, min_delay_s: float, max_delay_s: float) -> None:
        self.endpoint = endpoint
        self.min_delay_s = min_delay_s
        self.max_delay_s = max_delay_s
        self.state = ConnectionState(url)

    def _delay(self, attempts: int) -> float:
        return min(self.min_delay_s * 2 ** max(attempts - 1, 0), self.max_delay_s)

    def _backoff(self, delay: float) -> str:
        if delay >= self.max_delay_s:
            return f"retrying every {self.max_delay_s:g} s"
        return f"retrying in {delay:g} s, backing off to every {self.max_delay_s:g} s"

    def failed(self, failure: Failure, now: float) -> tuple[int, str] | None:
        """A connection attempt failed (or the broker dropped us before its CONNACK)."""
        prev = self.state
        attempts = 0 if prev.connected else prev.attempts
        attempts += 1
        if failure.final:
            self.state = replace(prev, connected=False, failure=failure, attempts=attempts,
                                 retry_s=None, final=True,
                                 since=now if prev.connected or prev.since is None else prev.since)
            return (logging.ERROR, f"broker {self.endpoint} refused us: {failure}; not retrying "
                                   "(fix the credentials or the ACL, then restart)")
        delay = self._delay(attempts)
        changed = prev.connected or prev.failure is None or prev.failure.cause != failure.cause
        self.state = replace(prev, connected=False, failure=failure, attempts=attempts,
                             retry_s=delay,
                             since=now if prev.connected or prev.since is None else prev.since)
        if not changed:
            return None
        verb = "unreachable" if failure.cause in _UNREACHABLE_CAUSES else "connection failed"
        return (logging.WARNING, f"broker {self.endpoint} {verb}: {failure}; {self._backoff(delay)}")

    def lost(self, failure: Failure, now: float) -> tuple[int, str] | None:
        """An established connection went down."""
        if not self.state.connected:
            return None
        self.state = replace(self.state, connected=False, since=now, failure=failure, attempts=0,
                             retry_s=self.min_delay_s)
        return (logging.WARNING,
                f"connection to broker {self.endpoint} lost: {failure}; reconnecting")

    def connected(self, now: float) -> tuple[int, str] | None:
        prev = self.state
        if prev.connected:
            return None
        self.state = replace(prev, connected=True, since=now, attempts=0, retry_s=None,
                             final=False)
        n = prev.attempts
        after = f" after {n} failed attempt{'s' if n > 1 else ''}" if n else ""
        return (logging.INFO, f"connected to broker {self.endpoint}{after}")


_UNREACHABLE_CAUSES = frozenset({Cause.REFUSED, Cause.NAME_NOT_FOUND, Cause.UNREACHABLE,
                                 Cause.TIMEOUT})
