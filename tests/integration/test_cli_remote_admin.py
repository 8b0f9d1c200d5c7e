"""The admin commands through the management API: `keys show/rotate/export/import`, `device
enroll/revoke`, `model inspect NAME:VERSION`, `model optimize`, `model compress`, against a
real `fleetctl server` (API on HTTPS, a private CA) on the session's Mosquitto. Each prints and
exits as it does on the server's host; a viewer or operator token is refused in the API's one
line (exit 2) and nothing is written; every write is audited with the token's name; hostile
requests are one-line problems that change nothing."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import ssl
from pathlib import Path
from typing import Any

import pytest

from deltafleet.server import pki
from tests.harness.modelgen import make_incompressible_onnx_model, make_onnx_pair
from tests.harness.remote_fleet import api_fleet, local, remote, same_as, untimed

pytestmark = [pytest.mark.broker, pytest.mark.slow]

BROKER = "mqtts://127.0.0.1:8883"  # what enrolled devices are told (no device connects here)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, broker):
    root = tmp_path_factory.mktemp("cli-admin")
    fleet = api_fleet(root, broker.url, "cli-admin/v1",
                      prepare=lambda lab: lab.fleetctl("keys", "init"))
    try:
        v1, _ = make_onnx_pair(root / "models", size_mb=0.5)
        noise = make_incompressible_onnx_model(root / "models" / "noise.onnx")
        for name, file in (("detector", v1), ("noise", noise)):
            up = remote(fleet, "model", "add", name, "v1", str(file), role="admin")
            assert up.returncode == 0, up.stderr
        fleet["lab"].fleetctl("model", "add", "twin", "v1", str(v1))  # optimized locally
        yield fleet
    finally:
        fleet["lab"].close()


def audit_rows(fleet) -> list[dict[str, Any]]:
    return json.loads(local(fleet, "audit", "--json").stdout)


def last_audit(fleet, action: str) -> dict[str, Any]:
    return [e for e in audit_rows(fleet) if e["action"] == action][-1]


def one_line(res) -> str:
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    return res.stderr


# -- keys ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [("keys", "show"), ("keys", "show", "--wide"),
                                  ("keys", "show", "--json")], ids=" ".join)
def test_keys_show_prints_the_same_through_the_api(fleet, args):
    shown = same_as(fleet, "admin", *args)
    assert shown.returncode == 0
    assert "PRIVATE" not in shown.stdout


def test_keys_export_writes_the_same_public_files(fleet, tmp_path):
    mine = local(fleet, "keys", "export", "--out", str(tmp_path / "here"))
    theirs = remote(fleet, "keys", "export", "--out", str(tmp_path / "there"), role="admin")
    assert (theirs.returncode, theirs.stdout) == (0, mine.stdout.replace("here", "there"))
    names = sorted(p.name for p in (tmp_path / "here").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "there").iterdir())
    assert "root.json" in names and not any(n.endswith(".key") for n in names)
    for n in names:
        assert (tmp_path / "there" / n).read_bytes() == (tmp_path / "here" / n).read_bytes()


def test_keys_rotate_through_the_api_activates_a_new_online_key_and_is_audited(fleet):
    before = json.loads(local(fleet, "keys", "show", "--json").stdout)
    res = remote(fleet, "keys", "rotate", role="admin")
    assert res.returncode == 0, res.stderr
    after = json.loads(local(fleet, "keys", "show", "--json").stdout)
    assert after["keylist_version"] == before["keylist_version"] + 1
    assert res.stdout == (f"key list v{after['keylist_version']} active; online key "
                          f"{after['online_keyid'][:16]}. Restart `fleetctl server` to publish "
                          "it.\n")
    entry = last_audit(fleet, "keys.rotate")
    assert entry["actor"] == "api:admin-1" and entry["subject"] == "online"
    mine = local(fleet, "keys", "rotate")  # the same line on the server's host
    assert re.fullmatch(r"key list v\d+ active; online key [0-9a-f]{16}\. Restart `fleetctl "
                        r"server` to publish it\.\n", mine.stdout), mine.stdout


def test_an_offline_root_signs_what_rotate_asked_through_the_api(fleet, tmp_path):
    """Root key offline: rotate writes a request, export brings it here, `keys sign` (which
    needs no server) signs it, import activates it, all with FLEET_API_URL set."""
    root_key = fleet["lab"].home / "keys" / "root.key"
    offline = tmp_path / "offline-root.key"
    shutil.move(root_key, offline)
    try:
        asked = remote(fleet, "keys", "rotate", role="admin")
        assert asked.returncode == 0 and asked.stdout.startswith("signing request written to ")
        assert remote(fleet, "keys", "export", "--out", str(tmp_path / "x"),
                      role="admin").returncode == 0
        signed = remote(fleet, "keys", "sign", str(tmp_path / "x" / "request.json"),
                        "--root-key", str(offline), "--out", str(tmp_path / "signed.json"))
        assert signed.returncode == 0, signed.stderr
        done = remote(fleet, "keys", "import", str(tmp_path / "signed.json"), role="admin")
        assert done.returncode == 0, done.stderr
        shown = json.loads(remote(fleet, "keys", "show", "--json", role="admin").stdout)
        assert done.stdout == (f"root v1, key list v{shown['keylist_version']} active. "
                               "Restart `fleetctl server` to publish it.\n")
        assert shown["pending_request"] is None
        assert last_audit(fleet, "keys.import")["actor"] == "api:admin-1"
        again = same_as(fleet, "admin", "keys", "import", str(tmp_path / "signed.json"))
        assert again.returncode == 0  # the same file again: the same list, nothing new
    finally:
        shutil.move(offline, root_key)


def test_private_keys_never_go_to_the_api(fleet, tmp_path):
    key = tmp_path / "root.key"
    key.write_text("not sent\n")
    res = remote(fleet, "keys", "rotate", "--root-key", str(key), role="admin")
    assert res.returncode == 2 and "never go to the API" in one_line(res)
    missing = same_as(fleet, "admin", "keys", "rotate", "--root")
    assert missing.returncode == 2 and "--new-root-pub" in one_line(missing)


# -- enrolment -------------------------------------------------------------------------------
def test_device_enroll_through_the_api_writes_the_bundle_enroll_writes(fleet, tmp_path):
    mine = local(fleet, "device", "enroll", "cam-8", "--out", str(tmp_path / "local"),
                 "--broker-url", BROKER, "--json")
    theirs = remote(fleet, "device", "enroll", "cam-9", "--out", str(tmp_path / "remote"),
                    "--broker-url", BROKER, "--json", role="admin")
    assert (mine.returncode, theirs.returncode) == (0, 0), theirs.stderr
    a, b = json.loads(mine.stdout), json.loads(theirs.stdout)
    assert [Path(f).name for f in a["files"]] == [Path(f).name for f in b["files"]]
    assert b["directory"] == str(tmp_path / "remote") and b["serial"].isdigit()
    for f in b["files"]:
        path, twin = Path(f), tmp_path / "local" / Path(f).name
        assert path.stat().st_mode & 0o777 == twin.stat().st_mode & 0o777, path.name
        if path.name in ("ca.crt", "root.json", "trust.json"):
            assert path.read_bytes() == twin.read_bytes(), path.name
    assert (tmp_path / "remote" / "agent.toml").read_text() == \
        (tmp_path / "local" / "agent.toml").read_text().replace("cam-8", "cam-9")
    cert = pki.load_cert((tmp_path / "remote" / "client.crt").read_bytes())
    assert pki.common_name(cert) == "cam-9" and str(cert.serial_number) == b["serial"]
    entry = last_audit(fleet, "device.enroll")
    assert (entry["actor"], entry["subject"]) == ("api:admin-1", "cam-9")
    text = remote(fleet, "device", "enroll", "cam-10", "--out", str(tmp_path / "t"),
                  "--broker-url", BROKER, role="admin")
    assert text.stdout == f"enrolled cam-10: bundle in {tmp_path / 't'}\n"


@pytest.mark.parametrize("args", [
    ("device", "enroll", "bad id"), ("device", "enroll", "x" * 65),
    ("device", "enroll", "cam-7", "--broker-url", "mqtt://127.0.0.1:1883"),
    ("device", "revoke", "bad/id"),
], ids=" ".join)
def test_a_refused_enrolment_says_the_same_line_and_issues_nothing(fleet, args, tmp_path):
    issued = (fleet["lab"].home / "pki" / "issued.json").read_text()
    res = same_as(fleet, "admin", *args, *(("--out", str(tmp_path / "b"))
                                           if args[1] == "enroll" else ()))
    assert res.returncode == 2
    one_line(res)
    assert (fleet["lab"].home / "pki" / "issued.json").read_text() == issued
    assert not (tmp_path / "b").exists()


def test_enroll_into_a_folder_that_is_not_empty_is_refused_before_the_server_issues(fleet,
                                                                                  tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("mine")
    issued = (fleet["lab"].home / "pki" / "issued.json").read_text()
    res = same_as(fleet, "admin", "device", "enroll", "cam-6", "--out", str(tmp_path / "b"),
                  "--broker-url", BROKER)
    assert res.returncode == 2 and "is not empty" in one_line(res)
    assert (fleet["lab"].home / "pki" / "issued.json").read_text() == issued


def test_device_revoke_through_the_api_denies_the_device_and_is_audited(fleet, tmp_path):
    for device_id in ("cam-20", "cam-21"):
        assert local(fleet, "device", "enroll", device_id, "--out", str(tmp_path / device_id),
                     "--broker-url", BROKER).returncode == 0
    mine = local(fleet, "device", "revoke", "cam-20", "--reason", "lost")
    theirs = remote(fleet, "device", "revoke", "cam-21", "--reason", "lost", role="admin")
    assert (theirs.returncode, theirs.stdout) == (0, mine.stdout.replace("cam-20", "cam-21"))
    assert theirs.stdout == ("revoked cam-21: 1 certificate(s) on the CRL; reload the broker "
                             "to apply it\n")
    denied = json.loads((fleet["lab"].home / "revoked.json").read_text())["revoked"]
    assert denied["cam-21"]["reason"] == "lost" and len(denied["cam-21"]["serials"]) == 1
    entry = last_audit(fleet, "device.revoke")
    assert (entry["actor"], entry["subject"]) == ("api:admin-1", "cam-21")
    again = same_as(fleet, "admin", "device", "enroll", "cam-21", "--out",
                    str(tmp_path / "again"), "--broker-url", BROKER)
    assert again.returncode == 2 and "is revoked" in one_line(again)


# -- models ----------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ("model", "inspect", "detector:v1"), ("model", "inspect", "detector:v1", "--json"),
    ("model", "inspect", "detector:v9"), ("model", "inspect", "nope:v1"),
    ("model", "inspect", "detector:"),
    ("model", "inspect", "detector:v1", "--variant", "nope"),
], ids=" ".join)
def test_model_inspect_of_a_registered_version_is_the_same_through_the_api(fleet, args):
    res = same_as(fleet, "viewer", *args)
    assert res.returncode in (0, 2)
    if res.returncode:
        one_line(res)


TIMED = {"latency_ms", "optimize_seconds"}


def test_model_optimize_through_the_api_registers_what_it_registers_locally(fleet):
    mine = local(fleet, "model", "optimize", "twin:v1", "--int8", "--json")
    theirs = remote(fleet, "model", "optimize", "detector:v1", "--int8", "--json", role="admin")
    assert (mine.returncode, theirs.returncode) == (0, 0), theirs.stderr
    assert untimed(json.loads(theirs.stdout), TIMED) == untimed(json.loads(mine.stdout), TIMED)
    entry = last_audit(fleet, "model.optimize")
    assert (entry["actor"], entry["subject"]) == ("api:admin-1", "detector:v1")
    shown = same_as(fleet, "viewer", "model", "inspect", "detector:v1", "--variant", "int8")
    assert "made from" in shown.stdout
    for args in (("model", "optimize", "detector:v1", "--int8"),  # exists now
                 ("model", "optimize", "detector:v1"), ("model", "optimize", "detector:v9",
                                                        "--fp16")):
        refused = same_as(fleet, "admin", *args)
        assert refused.returncode == 2
        one_line(refused)
    table = remote(fleet, "model", "optimize", "detector:v1", "--fp16", role="admin")
    assert table.returncode == 0, table.stderr
    assert "added detector:v1 variant fp16 (onnx, fp16) from default" in table.stdout
    assert "output deviation" in table.stdout


def test_model_compress_through_the_api_prints_the_same_and_is_audited(fleet):
    assert same_as(fleet, "admin", "model", "compress", "noise").stdout.endswith(
        "compression does not make it smaller; it ships as it is\n")
    entry = last_audit(fleet, "model.compress")
    assert (entry["actor"], entry["subject"]) == ("api:admin-1", "noise")
    assert same_as(fleet, "admin", "model", "compress", "detector").stdout == \
        "every variant already has its compressed form\n"
    assert same_as(fleet, "admin", "model", "compress", "nope").returncode == 2


# -- roles -----------------------------------------------------------------------------------
ADMIN_ONLY = [
    ("keys", "show"), ("keys", "rotate"), ("keys", "export", "--out", "{tmp}/x"),
    ("keys", "import", "{tmp}/signed.json"),
    ("device", "enroll", "cam-5", "--out", "{tmp}/x", "--broker-url", BROKER),
    ("device", "revoke", "cam-9"), ("model", "optimize", "detector:v1", "--prune", "50%"),
    ("model", "compress"),
]


@pytest.mark.parametrize("role", ["viewer", "operator"])
@pytest.mark.parametrize("args", ADMIN_ONLY, ids=" ".join)
def test_a_viewer_or_operator_token_is_refused_the_admin_commands(fleet, args, role,
                                                                  tmp_path):
    before = len(audit_rows(fleet))
    (tmp_path / "signed.json").write_text('{"v": 1, "type": "signed-trust"}')
    res = remote(fleet, *(a.replace("{tmp}", str(tmp_path)) for a in args), role=role)
    assert res.returncode == 2 and res.stdout == ""
    line = one_line(res)
    assert f"token '{role}-1' ({role}) may not" in line and "it needs the admin role" in line
    assert len(audit_rows(fleet)) == before and not (tmp_path / "x").exists()


# -- hostile requests ------------------------------------------------------------------------
def _https(fleet, method: str, path: str, body: bytes = b"", headers: dict | None = None,
           role: str = "admin") -> tuple[int, dict[str, Any]]:
    ctx = ssl.create_default_context(cafile=str(fleet["ca"]))
    port = int(fleet["url"].rsplit(":", 1)[1])
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    try:
        conn.request(method, "/api/v1" + path, body=body, headers={
            "Authorization": f"Bearer {fleet['tokens'][role]}",
            "Content-Type": "application/json", **(headers or {})})
        res = conn.getresponse()
        return res.status, json.loads(res.read() or b"{}")
    finally:
        conn.close()


HOSTILE = [
    ("POST", "/devices/cam%00x/enroll", b"{}"),
    ("POST", "/devices/" + "a" * 5000 + "/revoke", b"{}"),
    ("POST", "/devices/%ED%A0%80/enroll", b"{}"),
    ("POST", "/devices/cam-3/revoke", b'{"reason": "\\ud800"}'),
    ("POST", "/devices/cam-3/revoke", b'{"reason": "a\\u0000b"}'),
    ("POST", "/devices/cam-3/revoke", b'{"reason": 5}'),
    ("POST", "/devices/cam-3/enroll", b"{not json"),
    ("POST", "/devices/cam-3/enroll", b"[1, 2]"),
    ("POST", "/devices/cam-3/enroll", b'{"broker_url": "mqtts://a", "install_dir": "\\u0000"}'),
    ("POST", "/keys/rotate", b'{"root": "maybe"}'),
    ("POST", "/keys/import", b'{"v": 1, "type": "signed-trust", "keylist": "x"}'),
    ("POST", "/models/compress", b'{"model": ["x"]}'),
    ("GET", "/models/detector/versions/v1%00/inspect", b""),
]


@pytest.mark.parametrize(("method", "path", "body"), HOSTILE,
                         ids=[f"{m} {p[:40]} {b[:30]!r}" for m, p, b in HOSTILE])
def test_a_hostile_request_is_a_one_line_problem_and_writes_nothing(fleet, method, path, body):
    home = fleet["lab"].home
    before = (len(audit_rows(fleet)), (home / "pki" / "issued.json").read_text(),
              (home / "revoked.json").read_text() if (home / "revoked.json").exists() else "")
    status, problem = _https(fleet, method, path, body)
    assert 400 <= status < 500, (status, problem)
    assert problem["status"] == status and "\n" not in problem["detail"], problem
    after = (len(audit_rows(fleet)), (home / "pki" / "issued.json").read_text(),
             (home / "revoked.json").read_text() if (home / "revoked.json").exists() else "")
    assert after == before


def test_a_lying_content_length_is_refused_unread_or_cut_off(fleet):
    before = len(audit_rows(fleet))
    big, problem = _https(fleet, "POST", "/devices/cam-4/enroll", b"{}",
                          {"Content-Length": str(10 << 20)})
    assert big == 413 and problem["detail"] == "the JSON body is larger than 1 MiB"
    short, problem = _https(fleet, "POST", "/devices/cam-4/revoke", b'{"reason": "x"}',
                            {"Content-Length": "5"})
    assert short == 400 and problem["detail"] == "the request body is not valid JSON"
    assert len(audit_rows(fleet)) == before


def test_the_openapi_schema_lists_the_new_endpoints_with_their_roles(fleet):
    status, schema = _https(fleet, "GET", "/openapi.json", role="viewer")
    assert status == 200
    paths = schema["paths"]
    roles = {(p, m): op["x-role"] for p, ops in paths.items() for m, op in ops.items()
             if "x-role" in op}
    for path, method, role in (("/keys", "get", "admin"), ("/keys/trust", "get", "admin"),
                               ("/keys/rotate", "post", "admin"),
                               ("/keys/import", "post", "admin"),
                               ("/devices/{device_id}/enroll", "post", "admin"),
                               ("/devices/{device_id}/revoke", "post", "admin"),
                               ("/models/{name}/versions/{version}/inspect", "get", "viewer"),
                               ("/models/optimize", "post", "admin"),
                               ("/models/compress", "post", "admin")):
        assert roles[("/api/v1" + path, method)] == role, path
    form = paths["/api/v1/models/optimize"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]
    assert form["required"] == ["version"] and form["properties"]["eval"]["format"] == "binary"


MULTIPART = "multipart/form-data; boundary=b0"


def _form(**fields: str) -> bytes:
    return b"".join(f'--b0\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                    .encode("utf-8", "surrogatepass") for k, v in fields.items()) + b"--b0--\r\n"


@pytest.mark.parametrize("body", [
    b"--b0\r\nnot a part", _form(version="detector:v1\x00", int8="true"),
    _form(version="detector:v1", int8="maybe"),
    _form(version="detector:v1", int8="true", max_accuracy_drop="nan"),
    _form(version="detector:\ud800", int8="true"), _form(int8="true"),
], ids=["malformed", "nul", "bad-flag", "nan", "surrogate", "no-version"])
def test_a_hostile_optimize_form_is_a_one_line_problem_and_registers_nothing(fleet, body):
    before = (len(audit_rows(fleet)), local(fleet, "model", "show", "detector", "--json").stdout)
    status, problem = _https(fleet, "POST", "/models/optimize", body,
                             {"Content-Type": MULTIPART})
    assert 400 <= status < 500 and "\n" not in problem["detail"], (status, problem)
    assert (len(audit_rows(fleet)),
            local(fleet, "model", "show", "detector", "--json").stdout) == before


def test_a_root_rotation_through_the_api_sends_only_the_new_public_key(fleet, tmp_path):
    """Last in the module: it leaves a root rotation waiting for the offline signatures."""
    made = remote(fleet, "keys", "new-root", "--out", str(tmp_path / "new-root.key"))
    assert made.returncode == 0, made.stderr  # the offline machine's command runs anywhere
    keyid = re.search(r"new root key ([0-9a-f]{16})", made.stdout).group(1)
    asked = remote(fleet, "keys", "rotate", "--root", "--new-root-pub",
                   str(tmp_path / "new-root.pub"), role="admin")
    assert asked.returncode == 0 and asked.stdout.startswith("signing request written to ")
    assert remote(fleet, "keys", "export", "--out", str(tmp_path / "x"),
                  role="admin").returncode == 0
    request = json.loads((tmp_path / "x" / "request.json").read_text())
    assert [k[:16] for k in request["root"]["keys"]] == [keyid]
    assert last_audit(fleet, "keys.rotate")["subject"] == "root"
