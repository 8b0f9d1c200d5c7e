"""fleetctl as a client of the management API (``fleetctl server --api-listen``).

With ``FLEET_API_URL`` set, the commands that have an endpoint fetch their data from the API
instead of the local store and hand it to the same renderers (the API answers the JSON that
``--json`` prints); the commands that have none refuse in one line (``local_only``), never
falling back to a local store. Standard library only (urllib, json, ssl): the client path
loads no sqlalchemy, alembic, onnx or starlette, so it starts as fast as ``--help``.

Settings (the root options ``--api-url``, ``--token``, ``--token-file`` set the same):

- ``FLEET_API_URL``: ``https://host:8443`` (``/api/v1`` is added unless given);
- ``FLEET_API_TOKEN``, or ``FLEET_API_TOKEN_FILE`` (a file holding it, first line);
- ``FLEET_API_CA``: PEM file of the CA that signed the listener's certificate (a private CA);
  otherwise the system's trust store.

Errors: a problem response becomes ``error: <detail>`` (``detail`` is the line the CLI prints
for the same failure): 4xx exit 2 (400/404/409/422 bad input, 401/403 the token), a command
that failed on the server (500 ``failed``, e.g. `model optimize`'s accuracy gate) exit 1 with
its line; other 5xx and 429 exit 1 naming the API; a connection that fails is ``cannot reach
the API at URL: cause``, exit 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from ..errors import ServerError, UsageError

if TYPE_CHECKING:
    import ssl
    import urllib.error

# urllib.request, http.client and ssl are imported when a request is made: the local path,
# which imports this module to ask ``active()``, does not pay for them (~25 ms).

__all__ = ["ApiClient", "ApiConfig", "ApiFailed", "ApiRefused", "ApiUnavailable", "active", "client",
           "local_only", "quote_part"]

URL_ENV = "FLEET_API_URL"
TOKEN_ENV = "FLEET_API_TOKEN"
TOKEN_FILE_ENV = "FLEET_API_TOKEN_FILE"
CA_ENV = "FLEET_API_CA"
PREFIX = "/api/v1"
PAGE = 500  # the API's largest page
FAILED_TYPE = "urn:deltafleet:problem:failed"  # api.problems.FAILED_KIND
CHUNK_BYTES = 1 << 20


class ApiRefused(UsageError):
    """The API refused the request (4xx): bad input, unknown name, or the token (exit 2)."""


class ApiUnavailable(ServerError):
    """The API could not be reached, or failed (5xx, 429): not the operator's input (exit 1)."""


class ApiFailed(ServerError):
    """The command ran on the server and failed there, not by the operator's input (a 500
    problem of type ``failed``: the line the local command prints, exit 1)."""


def active() -> bool:
    """True when fleetctl should go through the API (``FLEET_API_URL`` is set)."""
    return bool(os.environ.get(URL_ENV, "").strip())


def local_only(command: str) -> None:
    """Refuse a command that has no API endpoint while ``FLEET_API_URL`` is set."""
    if active():
        raise UsageError(f"`fleetctl {command}` works on the server's host only; "
                         f"unset {URL_ENV}")


def quote_part(value: str | int) -> str:
    return quote(str(value), safe="")


@dataclass(frozen=True)
class ApiConfig:
    url: str  # as the operator gave it, for messages
    base: str  # ... ending in /api/v1
    token: str
    ca_file: Path | None = None
    timeout_s: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ApiConfig:
        env = os.environ if env is None else env
        url = env.get(URL_ENV, "").strip()
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"invalid {URL_ENV} {url!r}: use http(s)://HOST:PORT")
        base = url.rstrip("/")
        if not base.endswith(PREFIX):
            base += PREFIX
        token = env.get(TOKEN_ENV, "").strip()
        token_file = env.get(TOKEN_FILE_ENV, "").strip()
        if not token and token_file:
            try:
                token = (Path(token_file).read_text(encoding="utf-8").splitlines() or [""])[0]
            except OSError as e:
                raise UsageError(f"cannot read {TOKEN_FILE_ENV} {token_file}: "
                                 f"{e.strerror or e}") from None
            token = token.strip()
        if not token:
            raise UsageError(f"{URL_ENV} is set but no token: set {TOKEN_ENV} (or "
                             f"{TOKEN_FILE_ENV}, or give --token)")
        ca = env.get(CA_ENV, "").strip()
        if ca and not Path(ca).is_file():
            raise UsageError(f"{CA_ENV} {ca}: no such file")
        return cls(url=url, base=base, token=token, ca_file=Path(ca) if ca else None)


class ApiClient:
    """JSON over HTTP(S) to the management API, errors as the CLI's own."""

    def __init__(self, cfg: ApiConfig) -> None:
        import ssl  # noqa: PLC0415

        self.cfg = cfg
        self._ssl: ssl.SSLContext | None = None
        if cfg.base.startswith("https://"):
            self._ssl = ssl.create_default_context(
                cafile=str(cfg.ca_file) if cfg.ca_file else None)

    def get(self, path: str, query: Mapping[str, Any] | None = None) -> Any:
        return self._call("GET", path, query=query)

    def post(self, path: str, body: Mapping[str, Any] | None = None) -> Any:
        data = json.dumps(body or {}).encode()
        return self._call("POST", path, data=data,
                          headers={"Content-Type": "application/json"})

    def delete(self, path: str) -> Any:
        return self._call("DELETE", path)

    def get_all(self, path: str, query: Mapping[str, Any] | None = None) -> list[Any]:
        """Every item of a paged list (``{"items", "total", ...}``), page after page."""
        items: list[Any] = []
        while True:
            page = self.get(path, {**(query or {}), "limit": PAGE, "offset": len(items)})
            items.extend(page["items"])
            if not page["items"] or len(items) >= page["total"]:
                return items

    def upload(self, path: str, fields: Mapping[str, str], files: list[tuple[str, Path]],
               on_bytes: Callable[[int], None] | None = None) -> Any:
        """A multipart/form-data POST, the files streamed from disk."""
        import uuid  # noqa: PLC0415

        boundary = f"deltafleet-{uuid.uuid4().hex}"
        parts: list[bytes | Path] = []
        for name, value in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
                         f"\r\n\r\n{value}\r\n".encode())
        for name, file in files:
            filename = file.name.replace('"', "_")
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                         f'filename="{filename}"\r\nContent-Type: application/octet-stream'
                         "\r\n\r\n".encode())
            parts.extend((file, b"\r\n"))
        parts.append(f"--{boundary}--\r\n".encode())
        try:
            length = sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in parts)
        except OSError as e:
            raise UsageError(f"cannot read {e.filename}: {e.strerror}") from None

        def body() -> Iterator[bytes]:
            for p in parts:
                if isinstance(p, bytes):
                    yield p
                    continue
                with open(p, "rb") as f:
                    while chunk := f.read(CHUNK_BYTES):
                        if on_bytes:
                            on_bytes(len(chunk))
                        yield chunk

        return self._call("POST", path, data=body(), headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(length)}, timeout_s=max(self.cfg.timeout_s, 600.0))

    def _call(self, method: str, path: str, *, query: Mapping[str, Any] | None = None,
              data: Any = None, headers: Mapping[str, str] | None = None,
              timeout_s: float | None = None) -> Any:
        import http.client  # noqa: PLC0415
        import urllib.error  # noqa: PLC0415
        import urllib.request  # noqa: PLC0415

        query = {k: v for k, v in (query or {}).items() if v is not None}
        url = self.cfg.base + path + (f"?{urlencode(query, doseq=True)}" if query else "")
        request = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {self.cfg.token}", "Accept": "application/json",
            "User-Agent": "fleetctl", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.cfg.timeout_s,
                                        context=self._ssl) as res:
                raw = res.read()
        except urllib.error.HTTPError as e:
            raise self._problem(e) from None
        except urllib.error.URLError as e:
            raise ApiUnavailable(f"cannot reach the API at {self.cfg.url}: "
                                 f"{_cause(e.reason)}") from None
        except (OSError, ValueError, http.client.HTTPException) as e:  # reset, timed out, not HTTP
            raise ApiUnavailable(f"cannot reach the API at {self.cfg.url}: {_cause(e)}") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise ApiUnavailable(f"the API at {self.cfg.url} answered something that is not "
                                 "JSON (is FLEET_API_URL the API's address?)") from None

    def _problem(self, e: urllib.error.HTTPError) -> Exception:
        detail = kind = ""
        try:
            body = json.loads(e.read() or b"{}")
            if isinstance(body, dict):
                detail, kind = str(body.get("detail") or ""), str(body.get("type") or "")
        except (ValueError, OSError):
            pass
        detail = " ".join(detail.split()) or f"{e.code} {e.reason}"
        if e.code == 500 and kind == FAILED_TYPE:
            return ApiFailed(detail)
        if e.code == 429 or e.code >= 500:
            if e.code in (502, 503, 504):
                return ApiUnavailable(f"cannot reach the API at {self.cfg.url}: {detail}")
            return ApiUnavailable(f"the API at {self.cfg.url} failed ({e.code}): {detail}")
        return ApiRefused(detail)


def _cause(reason: object) -> str:
    import ssl  # noqa: PLC0415

    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"certificate verify failed ({reason.verify_message}); set {CA_ENV} to its CA"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return " ".join(str(reason).split()) or type(reason).__name__


def client() -> ApiClient:
    return ApiClient(ApiConfig.from_env())
