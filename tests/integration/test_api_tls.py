"""The API listener with a configured certificate speaks HTTPS only, and the console's cookies
are then Secure; its settings are checked before anything listens."""

from __future__ import annotations

import dataclasses
import http.client
import json
import ssl
from pathlib import Path

import pytest

from deltafleet.server import pki
from deltafleet.server.api.server import ApiServer, parse_listen
from deltafleet.server.api.tokens import create_token
from deltafleet.server.config import ServerConfig
from deltafleet.server.errors import UsageError
from deltafleet.server.store import Store, upgrade


@pytest.fixture
def tls_api(tmp_path: Path):
    cfg = ServerConfig.from_env({"FLEET_HOME": str(tmp_path / "home")})
    upgrade(cfg.db_url)
    ca = pki.create_ca("test CA")
    leaf = pki.issue_cert(ca, "fleet-api", server_hosts=["127.0.0.1"])
    (tmp_path / "api.crt").write_bytes(leaf.cert_pem)
    (tmp_path / "api.key").write_bytes(leaf.key_pem)
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    cfg = dataclasses.replace(cfg, api_listen="127.0.0.1:0",
                              api_tls_cert_file=tmp_path / "api.crt",
                              api_tls_key_file=tmp_path / "api.key")
    store = Store(cfg.db_url)
    with store.session() as s:
        _, secret = create_token(s, "tls-viewer", "viewer", "test")
    server = ApiServer(cfg, store)
    server.start()
    yield server, secret, tmp_path / "ca.crt"
    server.stop()
    store.dispose()


def test_the_api_speaks_https_with_the_configured_certificate(tls_api):
    server, secret, ca = tls_api
    assert server.url.startswith("https://127.0.0.1:")
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", server.bound_port(), context=ctx, timeout=10)
    conn.request("GET", "/api/v1/whoami", headers={"Authorization": f"Bearer {secret}"})
    res = conn.getresponse()
    assert res.status == 200 and json.loads(res.read()) == {"name": "tls-viewer", "role": "viewer"}
    conn.request("POST", "/api/v1/session", body=json.dumps({"token": secret}),
                 headers={"Content-Type": "application/json"})
    res = conn.getresponse()
    res.read()
    cookies = res.headers.get_all("set-cookie") or []
    assert cookies and all("secure" in c.lower() for c in cookies)
    conn.close()
    plain = http.client.HTTPConnection("127.0.0.1", server.bound_port(), timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain.request("GET", "/api/v1/health")
        plain.getresponse()
    plain.close()


def test_half_a_tls_configuration_is_refused(tmp_path: Path):
    cfg = ServerConfig.from_env({"FLEET_HOME": str(tmp_path), "FLEET_API_LISTEN": "0",
                                 "FLEET_API_TLS_CERT": str(tmp_path / "only.crt")})
    with pytest.raises(UsageError, match="both FLEET_API_TLS_CERT and FLEET_API_TLS_KEY"):
        ApiServer(cfg, Store("sqlite://"))


@pytest.mark.parametrize(("text", "expected"), [
    ("8080", ("127.0.0.1", 8080)), ("0.0.0.0:8443", ("0.0.0.0", 8443)),
    ("[::1]:9000", ("::1", 9000)),
])
def test_listen_addresses(text, expected):
    assert parse_listen(text) == expected


def test_a_bad_listen_address_is_one_clear_error():
    with pytest.raises(UsageError, match="expected HOST:PORT or PORT"):
        parse_listen("localhost:http")


def test_a_taken_port_is_one_clear_error(tmp_path: Path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = ServerConfig.from_env({"FLEET_HOME": str(tmp_path),
                                     "FLEET_API_LISTEN": f"127.0.0.1:{port}"})
        server = ApiServer(cfg, Store("sqlite://"))
        with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{port}: address "
                                             "already in use"):
            server.start()
