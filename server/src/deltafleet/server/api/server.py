"""The API listener inside `fleetctl server`: uvicorn in a thread with its own event loop.

The MQTT/reconcile loop (``daemon.FleetServer.run``) stays on its thread; the API shares only
the ``Store`` (a thread-safe engine pool). uvicorn installs no signal handlers off the main
thread; ``stop()`` asks it to exit and waits for in-flight requests.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

from ..config import ServerConfig
from ..errors import UsageError
from ..store import Store

__all__ = ["ApiServer", "parse_listen"]

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def parse_listen(text: str) -> tuple[str, int]:
    """``8080`` -> 127.0.0.1:8080; ``0.0.0.0:8443``; ``[::1]:8080``."""
    raw = text.strip()
    host, sep, port = raw.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", raw
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"FLEET_API_LISTEN {text!r}: expected HOST:PORT or PORT")
    return host, int(port)


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage().split(": ", 1)[-1] if "bind" in record.getMessage() \
            else record.getMessage()


class ApiServer:
    def __init__(self, cfg: ServerConfig, store: Store) -> None:
        import uvicorn  # noqa: PLC0415 - only a server with the API on loads it

        from .app import build_app  # noqa: PLC0415

        assert cfg.api_listen
        self.host, self.port = parse_listen(cfg.api_listen)
        cert, key = cfg.api_tls_cert_file, cfg.api_tls_key_file
        if (cert is None) != (key is None):
            raise UsageError("set both FLEET_API_TLS_CERT and FLEET_API_TLS_KEY (or neither)")
        for f in (cert, key):
            if f is not None and not Path(f).is_file():
                raise UsageError(f"API TLS file {f} does not exist")
        self.tls = cert is not None
        if not self.tls and self.host not in LOOPBACK:
            log.warning("the API listens on %s without TLS: tokens cross the network in clear; "
                        "set FLEET_API_TLS_CERT and FLEET_API_TLS_KEY", self.host)
        self.app = build_app(cfg, store, secure_cookies=self.tls)
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning",
                                access_log=False, lifespan="off", server_header=False,
                                log_config=None,  # fleetctl server's logging, not uvicorn's
                                ssl_certfile=str(cert) if cert else None,
                                ssl_keyfile=str(key) if key else None)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="fleet-api", daemon=True)

    def _run(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits on a failed bind: start() says so
            self._server.run()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = self.bound_port()
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def bound_port(self) -> int:
        for server in getattr(self._server, "servers", []) or []:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self.port

    def start(self, timeout_s: float = 15.0) -> None:
        """Listen, or raise UsageError with uvicorn's reason as one line (its start-up log is
        held back meanwhile, so a bad address prints one error, not two)."""
        uv_log = logging.getLogger("uvicorn.error")
        held = _Held()
        uv_log.addHandler(held)
        uv_log.propagate = False
        try:
            self._thread.start()
            deadline = time.monotonic() + timeout_s
            while not self._server.started:
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    reason = held.last or "no reason given"
                    raise UsageError(f"the API cannot listen on {self.host}:{self.port}: "
                                     f"{reason}")
                time.sleep(0.02)
        finally:
            uv_log.removeHandler(held)
            uv_log.propagate = True
        log.info("management API and console on %s", self.url)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
