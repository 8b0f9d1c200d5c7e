"""A small HTTP client for the management API (http.client, no extra dependency).

``source`` picks the client's address on the loopback range (127.0.0.2, ...), so a test of the
failed-login limit, which counts per client address, does not lock the other tests out.
"""

from __future__ import annotations

import http.client
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any
    set_cookies: list[str] = field(default_factory=list)

    @property
    def problem(self) -> dict[str, Any]:
        assert self.headers.get("content-type", "").startswith("application/problem+json"), self
        return self.body


@dataclass
class ApiClient:
    port: int
    token: str | None = None
    source: str | None = None
    cookies: dict[str, str] = field(default_factory=dict)

    def request(self, method: str, path: str, *, json_body: Any = None, query: Any = None,
                headers: dict[str, str] | None = None, body: bytes | None = None,
                token: str | None = None) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30,
                                          source_address=(self.source, 0) if self.source else None)
        h = dict(headers or {})
        secret = token or self.token
        if secret:
            h["Authorization"] = f"Bearer {secret}"
        if self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if json_body is not None:
            body = json.dumps(json_body).encode()
            h["Content-Type"] = "application/json"
        url = path + (("?" + urlencode(query, doseq=True)) if query else "")
        try:
            conn.request(method, url, body=body, headers=h)
            res = conn.getresponse()
            raw = res.read()
            set_cookies = res.headers.get_all("set-cookie") or []
            for cookie in set_cookies:
                name, _, rest = cookie.partition("=")
                self.cookies[name] = rest.split(";", 1)[0]
            hdrs = {k.lower(): v for k, v in res.getheaders()}
        finally:
            conn.close()
        ctype = hdrs.get("content-type", "")
        data: Any = json.loads(raw) if raw and "json" in ctype else raw
        return Reply(res.status, hdrs, data, set_cookies)

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, json_body: Any = None, **kw: Any) -> Reply:
        return self.request("POST", path, json_body=json_body if json_body is not None else {},
                            **kw)

    def upload(self, path: str, fields: dict[str, str], files: dict[str, Path]) -> Reply:
        boundary = uuid.uuid4().hex
        parts: list[bytes] = []
        for k, v in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'
                         f"{v}\r\n".encode())
        for k, p in files.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; '
                         f'filename="{p.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                         .encode() + p.read_bytes() + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        return self.request("POST", path, body=b"".join(parts),
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def events(self, path: str, *, last_event_id: int | None = None,
               timeout_s: float = 120) -> Iterator[ServerEvent]:
        """The server-sent events of ``path`` as they arrive, until the server ends the
        stream (a non-200 answer raises, with the problem)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        h = {"Accept": "text/event-stream"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        if last_event_id is not None:
            h["Last-Event-ID"] = str(last_event_id)
        try:
            conn.request("GET", path, headers=h)
            res = conn.getresponse()
            if res.status != 200:
                raise AssertionError(f"{path}: {res.status} {res.read()!r}")
            fields: dict[str, str] = {}
            while line := res.readline():
                text = line.decode().rstrip("\r\n")
                if text:
                    key, _, value = text.partition(": ")
                    fields[key] = value
                    continue
                if "event" in fields:
                    yield ServerEvent(fields["event"], json.loads(fields.get("data", "null")),
                                      int(fields["id"]) if "id" in fields else None)
                fields = {}
        finally:
            conn.close()


@dataclass(frozen=True)
class ServerEvent:
    event: str
    data: Any
    id: int | None = None
