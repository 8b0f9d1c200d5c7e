"""The management API against a real `fleetctl server` process (API on FLEET_API_LISTEN), a
real Mosquitto and two fleet-agent processes: a model uploaded and a rollout created over the
API reach the devices; roles, revocation, CSRF, the failed-login limit and problem JSON."""

from __future__ import annotations

import re

import pytest

from deltafleet.server.api.app import ROUTES
from deltafleet.shared import sha256_file
from tests.harness.api_client import ApiClient
from tests.harness.fleetlab import Lab, free_port, wait_for
from tests.harness.modelgen import make_onnx_pair

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DEVICES = {"cam-1": "jetson", "cam-2": "jetson"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, broker):
    root = tmp_path_factory.mktemp("api")
    lab = Lab(root / "lab", mqtt_url=broker.url)
    lab.env["FLEET_TOPIC_PREFIX"] = "api/v1"  # the session broker is shared with other tests
    port = free_port()
    lab.env["FLEET_API_LISTEN"] = f"127.0.0.1:{port}"
    try:
        v1, v2 = make_onnx_pair(root / "models", size_mb=0.5)
        tokens = lab.serve_api(port, DEVICES)
        admin = ApiClient(port, tokens["admin"])
        ops = ApiClient(port, tokens["operator"])
        uploaded = admin.upload("/api/v1/models/detector/versions", {"version": "v1"},
                                {"file": v1})
        assert uploaded.status == 201, uploaded
        group = ops.post("/api/v1/groups", {"name": "cams", "match": ["hw=jetson"]})
        assert group.status == 201, group
        wait_for(lambda: ops.get("/api/v1/devices", query={"online": "true"}).body["total"]
                 == len(DEVICES), 60, "agents online")
        created = ops.post("/api/v1/rollouts", {"version": "detector:v1", "group": "cams",
                                                "health_window": "1s"})
        assert created.status == 201, created
        rid = created.body["id"]
        done = wait_for(lambda: (r := ops.get(f"/api/v1/rollouts/{rid}").body)["state"]
                        in ("completed", "paused", "aborted", "rolled_back") and r, 90,
                        "the rollout to end")
        yield {"lab": lab, "port": port, "tokens": tokens, "v1": v1, "v2": v2,
               "rollout": done, "uploaded": uploaded.body}
    finally:
        lab.close()


def client(fleet, role: str | None = None, **kw) -> ApiClient:
    return ApiClient(fleet["port"], fleet["tokens"][role] if role else None, **kw)


def test_a_rollout_created_over_the_api_reaches_the_devices_and_completes(fleet):
    r = fleet["rollout"]
    assert r["state"] == "completed", r
    assert {t["device"]: t["state"] for t in r["targets"]} == dict.fromkeys(DEVICES, "healthy")
    sha = sha256_file(fleet["v1"])
    assert fleet["uploaded"]["variants"][0]["sha256"] == sha
    for device_id in DEVICES:
        assert fleet["lab"].agent_status(device_id)[0]["sha256"] == sha
        shown = client(fleet, "viewer").get(f"/api/v1/devices/{device_id}").body
        assert [(m["model"], m["version"]) for m in shown["running"]] == [("detector", "v1")]
        history = client(fleet, "viewer").get(f"/api/v1/devices/{device_id}/history").body
        assert history["rollouts"][0]["rollout_id"] == r["id"]


def test_every_write_is_audited_with_the_tokens_name(fleet):
    entries = client(fleet, "viewer").get("/api/v1/audit", query={"limit": 500}).body["items"]
    by_action = {e["action"]: e["actor"] for e in entries}
    assert by_action["model.add"] == "api:admin-1"
    assert by_action["group.create"] == "api:operator-1"
    assert by_action["rollout.create"] == "api:operator-1"


def test_no_endpoint_answers_without_a_token_but_the_health_check(fleet):
    anon = client(fleet)
    assert anon.get("/api/v1/health").status == 200
    for r in ROUTES:
        path = "/api/v1" + re.sub(r"\{[^}]+\}", "1", r.path)
        reply = anon.request(r.method, path, json_body={} if r.method != "GET" else None)
        assert reply.status == 401, (r.method, path, reply)
        assert reply.problem["status"] == 401 and reply.problem["title"] == "unauthorized"
    assert anon.get("/api/v1/openapi.json").status == 401
    schema = client(fleet, "viewer").get("/api/v1/openapi.json").body
    assert schema["openapi"].startswith("3.") and "/api/v1/rollouts/{rollout_id}" in schema["paths"]


def test_a_viewer_reads_but_cannot_write(fleet):
    viewer = client(fleet, "viewer")
    assert viewer.get("/api/v1/rollouts").status == 200
    before = viewer.get("/api/v1/audit").body["total"]
    rid = fleet["rollout"]["id"]
    for path, body in (("/api/v1/rollouts", {"version": "detector:v1", "group": "cams"}),
                       (f"/api/v1/rollouts/{rid}/pause", {}),
                       (f"/api/v1/rollouts/{rid}/rollback", {}),
                       ("/api/v1/groups", {"name": "x", "all": True}),
                       ("/api/v1/tokens", {"name": "mine", "role": "admin"})):
        reply = viewer.post(path, body)
        assert reply.status == 403, (path, reply)
        assert "viewer" in reply.problem["detail"]
    upload = viewer.upload("/api/v1/models/detector/versions", {"version": "v2"},
                           {"file": fleet["v2"]})
    assert upload.status == 403
    # operators roll out but do not manage models or tokens
    assert client(fleet, "operator").upload("/api/v1/models/detector/versions",
                                            {"version": "v2"}, {"file": fleet["v2"]}).status == 403
    assert client(fleet, "operator").get("/api/v1/tokens").status == 403
    assert viewer.get("/api/v1/audit").body["total"] == before  # nothing was written


def test_errors_are_problem_json_with_the_message_the_cli_prints(fleet):
    lab, ops = fleet["lab"], client(fleet, "operator")
    cases = [
        (ops.get("/api/v1/rollouts/999"), ("rollout", "status", "999"), 404),
        (ops.post("/api/v1/rollouts", {"version": "detector:v1", "group": "nope"}),
         ("rollout", "model", "detector:v1", "--group", "nope"), 404),
        (ops.post("/api/v1/rollouts", {"version": "detector:v1", "group": "cams",
                                       "waves": "bogus"}),
         ("rollout", "model", "detector:v1", "--group", "cams", "--waves", "bogus"), 400),
        (ops.get("/api/v1/devices/ghost"), ("device", "show", "ghost"), 404),
    ]
    for reply, argv, status in cases:
        p = reply.problem
        assert set(p) == {"type", "title", "status", "detail"} and p["status"] == status == reply.status
        cli = lab.fleetctl(*argv, check=False)
        assert cli.returncode == 2 and cli.stderr.strip() == f"error: {p['detail']}", (argv, cli)
    bad = ops.request("POST", "/api/v1/rollouts", body=b"{not json",
                      headers={"Content-Type": "application/json"})
    assert bad.status == 400 and bad.problem["detail"] == "the request body is not valid JSON"
    assert ops.get("/api/v1/devices", query={"limit": "0"}).problem["status"] == 400


def test_devices_list_filters_and_pages(fleet):
    viewer = client(fleet, "viewer")
    page = viewer.get("/api/v1/devices", query={"limit": 1, "offset": 1}).body
    assert page["total"] == 2 and [d["id"] for d in page["items"]] == ["cam-2"]
    assert viewer.get("/api/v1/devices", query={"label": "hw=jetson", "model": "detector",
                                                "version": "v1"}).body["total"] == 2
    assert viewer.get("/api/v1/devices", query={"label": "hw=rpi"}).body["total"] == 0
    assert viewer.get("/api/v1/devices", query={"q": "cam-1"}).body["items"][0]["id"] == "cam-1"
    assert viewer.get("/api/v1/devices/cam-1/labels").body["labels"] == {"hw": "jetson",
                                                                        "site": "lab"}
    members = viewer.get("/api/v1/groups/cams").body
    assert [m["id"] for m in members["members"]] == ["cam-1", "cam-2"]


def test_a_revoked_token_is_refused_at_once(fleet):
    admin = client(fleet, "admin")
    made = admin.post("/api/v1/tokens", {"name": "short-lived", "role": "operator"})
    assert made.status == 201 and made.body["token"].startswith("dft_")
    bearer = ApiClient(fleet["port"], made.body["token"])
    console = ApiClient(fleet["port"])
    assert console.post("/api/v1/session", {"token": made.body["token"]}).status == 200
    assert bearer.get("/api/v1/whoami").body == {"name": "short-lived", "role": "operator"}
    assert console.get("/api/v1/whoami").status == 200
    fleet["lab"].fleetctl("token", "revoke", "short-lived")
    assert bearer.get("/api/v1/whoami").status == 401
    assert console.get("/api/v1/whoami").status == 401
    listed = {t["name"]: t for t in admin.get("/api/v1/tokens").body}
    assert listed["short-lived"]["revoked_at"] is not None and "token" not in listed["short-lived"]


def test_cookie_writes_need_the_csrf_header(fleet):
    console = ApiClient(fleet["port"])
    login = console.post("/api/v1/session", {"token": fleet["tokens"]["operator"]})
    assert login.status == 200 and login.body["role"] == "operator"
    cookies = {c.split("=", 1)[0]: c.lower() for c in login.set_cookies}
    assert "httponly" in cookies["fleet_session"] and "samesite=strict" in cookies["fleet_session"]
    assert "httponly" not in cookies["fleet_csrf"]  # the console reads it to echo it
    rid = fleet["rollout"]["id"]
    refused = console.post(f"/api/v1/rollouts/{rid}/pause")
    assert refused.status == 403 and refused.problem["type"].endswith(":csrf")
    wrong = console.post(f"/api/v1/rollouts/{rid}/pause", headers={"X-CSRF-Token": "guess"})
    assert wrong.status == 403
    ok = console.post(f"/api/v1/rollouts/{rid}/pause",
                      headers={"X-CSRF-Token": login.body["csrf"]})
    # the rollout completed: pausing it is refused by the rollout's rules, not by CSRF
    assert ok.status == 400 and ok.problem["detail"] == (f"rollout {rid} is completed; cannot "
                                                         "pause it")


def test_failed_logins_are_rate_limited_per_client_address(fleet):
    attacker = ApiClient(fleet["port"], source="127.0.0.2")
    codes = [attacker.post("/api/v1/session", {"token": f"dft_guess{i}"}).status
             for i in range(10)]
    assert codes == [401] * 10
    limited = attacker.post("/api/v1/session", {"token": fleet["tokens"]["admin"]})
    assert limited.status == 429 and int(limited.headers["retry-after"]) > 0
    assert attacker.get("/api/v1/whoami", token=fleet["tokens"]["admin"]).status == 429
    assert client(fleet, "admin").get("/api/v1/whoami").status == 200  # other addresses: fine


def test_the_plan_over_the_api_is_the_cli_plan(fleet):
    plan = client(fleet, "viewer").get("/api/v1/rollouts/plan",
                                       query={"version": "detector:v1", "group": "cams"}).body
    assert plan == fleet["lab"].fleetctl_json("rollout", "plan", "detector:v1", "--group", "cams")
    assert {d["device"] for d in plan["devices"]} == set(DEVICES)


def test_operator_actions_over_the_api_are_idempotent_and_follow_the_rollouts_rules(fleet):
    ops = client(fleet, "operator")
    assert ops.post("/api/v1/groups", {"name": "nobody", "match": ["hw=none"]}).status == 201
    empty = ops.post("/api/v1/rollouts", {"version": "detector:v1", "group": "nobody"})
    assert empty.status == 400 and "--allow-empty" in empty.problem["detail"]
    rid = ops.post("/api/v1/rollouts", {"version": "detector:v1", "group": "nobody",
                                        "allow_empty": True}).body["id"]
    steps = [(a, ops.post(f"/api/v1/rollouts/{rid}/{a}").body)
             for a in ("pause", "pause", "resume", "abort")]
    assert [(a, b["changed"]) for a, b in steps] == [("pause", True), ("pause", False),
                                                     ("resume", True), ("abort", True)]
    shown = ops.get(f"/api/v1/rollouts/{rid}").body
    assert shown["state"] in ("aborting", "aborted") and "pause" not in shown["actions"]
    assert "rollback" in shown["actions"]
    assert ops.post(f"/api/v1/rollouts/{rid}/resume").problem["status"] == 400


def test_a_rollout_streams_its_status_as_server_sent_events_until_it_ends(fleet):
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", fleet["port"], timeout=30)
    rid = fleet["rollout"]["id"]
    conn.request("GET", f"/api/v1/rollouts/{rid}/stream",
                 headers={"Authorization": f"Bearer {fleet['tokens']['viewer']}"})
    res = conn.getresponse()
    assert res.status == 200 and res.headers["content-type"].startswith("text/event-stream")
    text = res.read().decode()  # a completed rollout: its device events, its status, the end
    conn.close()
    *moves, event = [b for b in text.split("\n\n") if b.strip()]
    name, data = event.split("\n", 1)
    assert name == "event: status"
    assert json.loads(data.removeprefix("data: "))["state"] == "completed"
    assert moves and all(m.startswith("id: ") and "\nevent: device\n" in m for m in moves)
    assert client(fleet).get(f"/api/v1/rollouts/{rid}/stream").status == 401


def test_fleetctl_token_refuses_a_bad_role_and_never_lists_secrets(fleet):
    lab = fleet["lab"]
    bad = lab.fleetctl("token", "create", "x", "--role", "root", check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == ("error: invalid role 'root': use "
                                                          "viewer, operator or admin")
    dup = lab.fleetctl("token", "create", "viewer-1", check=False)
    assert dup.returncode == 2 and "exists" in dup.stderr
    listed = lab.fleetctl("token", "list").stdout
    assert "viewer-1" in listed and "dft_" not in listed


def test_the_console_serves_only_its_own_static_files(fleet):
    anon = client(fleet)
    index = anon.get("/")
    assert index.status == 200 and b"/static/console.js" in index.body
    assert "script-src 'self'" in index.headers["content-security-policy"]
    assert anon.get("/static/console.js").status == 200
    key = (fleet["lab"].home / "keys" / "signing.key").read_bytes()
    for path in ("/static/../app.py", "/static/..%2f..%2f..%2fkeys%2fsigning.key",
                 "/static/%2e%2e/tokens.py", "/keys/signing.key"):
        reply = anon.get(path)
        assert reply.status == 404 and key not in (reply.body if isinstance(reply.body, bytes)
                                                   else b""), path
