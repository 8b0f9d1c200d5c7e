"""Who a request is: a bearer token, or a console session cookie (with CSRF for writes).

- ``Authorization: Bearer <token>``: for API clients; no cookie, so no CSRF question.
- Console: the token pasted into the login form is exchanged for a session: an HttpOnly,
  SameSite=Strict cookie naming a random session id held in memory, plus a CSRF token (a
  readable cookie the console echoes in ``X-CSRF-Token`` on every write: double submit,
  compared in constant time with the session's). Sessions end after ``SESSION_TTL_S``, at
  logout, at a server restart, and at once when their token is revoked: every request reads
  the token's row again.
- Failed authentication (bad token at login or as bearer) is counted per client address: past
  ``FAILURES_PER_WINDOW`` in ``FAILURE_WINDOW_S`` the address gets 429 until the window moves.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

__all__ = ["FailureLimiter", "Session", "SessionTable"]

SESSION_TTL_S = 8 * 3600
FAILURES_PER_WINDOW = 10
FAILURE_WINDOW_S = 60.0
SESSION_COOKIE = "fleet_session"
CSRF_COOKIE = "fleet_csrf"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True, slots=True)
class Session:
    token_sha256: str
    csrf: str
    expires_at: float  # time.monotonic()

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(),
                                                            self.csrf.encode())


@dataclass
class SessionTable:
    """Console sessions by id (in memory: a restart logs every console out)."""

    ttl_s: float = SESSION_TTL_S
    _by_id: dict[str, Session] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, token_sha256: str, now: float | None = None) -> tuple[str, Session]:
        now = time.monotonic() if now is None else now
        sid = secrets.token_urlsafe(32)
        session = Session(token_sha256, secrets.token_urlsafe(32), now + self.ttl_s)
        with self._lock:
            self._by_id = {k: v for k, v in self._by_id.items() if v.expires_at > now}
            self._by_id[sid] = session
        return sid, session

    def get(self, sid: str | None, now: float | None = None) -> Session | None:
        if not sid:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            session = self._by_id.get(sid)
            if session is not None and session.expires_at <= now:
                del self._by_id[sid]
                return None
        return session

    def close(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)


@dataclass
class FailureLimiter:
    """Failed authentications per client address in a sliding window (pure but for the lock)."""

    limit: int = FAILURES_PER_WINDOW
    window_s: float = FAILURE_WINDOW_S
    _failures: dict[str, deque[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def retry_after(self, client: str, now: float | None = None) -> float:
        """Seconds until ``client`` may try again (0: now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            q = self._failures.get(client)
            if not q:
                return 0.0
            while q and q[0] <= now - self.window_s:
                q.popleft()
            if len(q) < self.limit:
                return 0.0
            return max(0.0, q[0] + self.window_s - now)

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._failures) > 10_000:  # bounded memory under a spray of addresses
                self._failures = {k: q for k, q in self._failures.items()
                                  if q and q[-1] > now - self.window_s}
            self._failures.setdefault(client, deque(maxlen=self.limit * 2)).append(now)
