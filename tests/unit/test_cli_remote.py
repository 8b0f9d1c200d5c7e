"""fleetctl's API client: light imports, settings read once, problem JSON as the CLI's errors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deltafleet.server.cli._common import fmt_selector
from deltafleet.server.cli.remote import (
    ApiClient,
    ApiConfig,
    ApiFailed,
    ApiRefused,
    ApiUnavailable,
)
from deltafleet.server.errors import UsageError
from deltafleet.server.fleet import format_selector

HEAVY = ("sqlalchemy", "alembic", "onnx", "starlette", "numpy", "uvicorn")

PROBE = """
import sys
sys.argv = ["fleetctl", *sys.argv[1:]]
from deltafleet.server.cli import main
try:
    main()
except SystemExit:
    pass
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
print("HEAVY", ",".join(heavy), file=sys.stderr)
""".replace("HEAVY)", repr(HEAVY) + ")")


@pytest.mark.parametrize("args", [
    ["device", "list"], ["device", "show", "cam-1", "--json"], ["group", "list"],
    ["model", "list"], ["model", "show", "detector"], ["rollout", "status", "1"],
    ["rollout", "list"], ["rollout", "pause", "1"], ["audit"], ["group", "show", "cams"],
    ["rollout", "plan", "d:v1", "-g", "cams"], ["model", "add", "d", "v1", "/nonexistent.onnx"],
    ["rollout", "model", "d:v1", "-g", "cams", "--wait"],
    ["keys", "show"], ["keys", "rotate"], ["keys", "export", "--out", "/nonexistent/x"],
    ["device", "enroll", "cam-9", "--out", "/nonexistent/x"], ["device", "revoke", "cam-1"],
    ["model", "inspect", "d:v1", "--json"], ["model", "optimize", "d:v1", "--int8"],
    ["model", "compress"], ["delta", "list"],
    ["delta", "show", "1", "--json"], ["delta", "build", "d:v1", "d:v2"],
    ["device", "variants", "cam-1"],
])
def test_the_api_path_loads_no_database_or_model_library(args, tmp_path: Path):
    env = {"FLEET_API_URL": "http://127.0.0.1:9", "FLEET_API_TOKEN": "dft_x",
           "FLEET_HOME": str(tmp_path / "none"), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, text=True,
                         capture_output=True, timeout=60)
    lines = res.stderr.strip().splitlines()
    assert lines[-1].strip() == "HEAVY", res.stderr
    assert lines[0].startswith("error: ") and len(lines) == 2, res.stderr
    assert not (tmp_path / "none").exists()


def test_settings_need_a_url_with_a_scheme_and_a_token(tmp_path: Path):
    with pytest.raises(UsageError, match="http"):
        ApiConfig.from_env({"FLEET_API_URL": "fleet:8080", "FLEET_API_TOKEN": "t"})
    with pytest.raises(UsageError, match="FLEET_API_TOKEN"):
        ApiConfig.from_env({"FLEET_API_URL": "http://fleet:8080"})
    token = tmp_path / "token"
    token.write_text("dft_abc\n")
    cfg = ApiConfig.from_env({"FLEET_API_URL": "https://fleet:8443/",
                              "FLEET_API_TOKEN_FILE": str(token)})
    assert (cfg.base, cfg.token) == ("https://fleet:8443/api/v1", "dft_abc")
    same = ApiConfig.from_env({"FLEET_API_URL": "https://fleet:8443/api/v1",
                               "FLEET_API_TOKEN": "t"})
    assert same.base == "https://fleet:8443/api/v1"
    with pytest.raises(UsageError, match="FLEET_API_CA"):
        ApiConfig.from_env({"FLEET_API_URL": "https://f", "FLEET_API_TOKEN": "t",
                            "FLEET_API_CA": str(tmp_path / "nope.pem")})


class _Problems(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        last = self.path.split("?")[0].rsplit("/", 1)[-1]
        status = 500 if last == "failed" else int(last)
        if status == 200:
            body, kind = {"items": [1, 2], "total": 2}, "application/json"
        else:
            body, kind = {"status": status, "detail": f"the  line\nfor {status}"}, \
                "application/problem+json"
            if last == "failed":
                body["type"] = "urn:deltafleet:problem:failed"
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def problems():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Problems)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    yield ApiClient(ApiConfig.from_env({"FLEET_API_URL": url, "FLEET_API_TOKEN": "t"})), url
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_a_4xx_problem_is_a_usage_error_with_its_detail(problems, status):
    api, _ = problems
    with pytest.raises(ApiRefused) as e:
        api.get(f"/x/{status}")
    assert str(e.value) == f"the line for {status}"
    assert isinstance(e.value, UsageError)  # exit 2


@pytest.mark.parametrize("status", [429, 500, 503])
def test_a_5xx_problem_is_not_the_operators_fault(problems, status):
    api, url = problems
    with pytest.raises(ApiUnavailable) as e:
        api.get(f"/x/{status}")
    assert url in str(e.value) and f"the line for {status}" in str(e.value)
    assert not isinstance(e.value, UsageError)  # exit 1


def test_a_command_that_failed_on_the_server_is_its_own_line_exit_1(problems):
    api, url = problems
    with pytest.raises(ApiFailed) as e:
        api.get("/x/failed")
    assert str(e.value) == "the line for 500"  # as the local command prints it
    assert url not in str(e.value) and not isinstance(e.value, UsageError)  # exit 1


def test_a_paged_list_is_read_whole(problems):
    api, _ = problems
    assert api.get_all("/x/200") == [1, 2]


def test_the_selector_shown_is_the_one_fleet_writes():
    selector = {"arch": "aarch64", "hw": ["jetson", "xavier"]}
    assert fmt_selector(selector) == format_selector(selector) == \
        "arch=aarch64, hw in (jetson, xavier)"
