"""`fleetctl` as a client of the management API: a real `fleetctl server` with its API on an
HTTPS listener (a certificate from a private CA), a real Mosquitto and two fleet-agent
processes. Each covered command run on the local store and through FLEET_API_URL prints the
same thing and exits the same; a rollout started through the API reaches the devices and
`rollout model --wait` exits 0; refusals are one line."""

from __future__ import annotations

import json
import re

import pytest

from deltafleet.shared import sha256_file
from tests.harness.fleetlab import free_port, wait_for
from tests.harness.remote_cli import DEVICES, local, remote, same, same_as

pytestmark = [pytest.mark.broker, pytest.mark.slow]



@pytest.fixture(scope="module")
def fleet(api_fleet):
    return api_fleet


_same, _same_as = same, same_as


READS = [
    ("device", "list"), ("device", "list", "--wide"), ("device", "list", "--json"),
    ("device", "list", "--group", "cams", "--json"),
    ("device", "show", "cam-1"), ("device", "show", "cam-1", "--json"),
    ("device", "history", "cam-1", "--wide"), ("device", "history", "cam-2", "--json"),
    ("device", "labels", "cam-1"), ("device", "labels", "cam-1", "--json"),
    ("device", "variants", "cam-1"), ("device", "variants", "cam-2", "--wide"),
    ("device", "variants", "cam-1", "--json"),
    ("group", "list"), ("group", "list", "--json"), ("group", "show", "cams", "--wide"),
    ("group", "show", "cams", "--json"),
    ("model", "list"), ("model", "list", "--wide", "--json"), ("model", "show", "detector"),
    ("model", "show", "detector", "--json"),
    ("rollout", "list"), ("rollout", "list", "--json"),
    ("rollout", "plan", "detector:v1", "-g", "cams"),
    ("rollout", "plan", "detector:v1", "-g", "cams", "--wide", "--json"),
    ("audit",), ("audit", "--json"), ("audit", "--since", "1h", "--wide"),
]


@pytest.mark.parametrize("args", READS, ids=" ".join)
def test_a_read_command_prints_the_same_through_the_api(fleet, args):
    assert _same(fleet, *args).returncode == 0


ERRORS = [
    ("device", "show", "nope"), ("device", "history", "nope"), ("device", "variants", "nope"),
    ("group", "show", "nope"), ("model", "show", "nope"),
    ("rollout", "status", "999"), ("rollout", "plan", "detector:v9", "-g", "cams"),
    ("rollout", "pause", "999"), ("audit", "--since", "yesterday"),
    ("rollout", "model", "detector:v1", "-g", "cams", "--waves", "lots"),
    ("group", "create", "cams", "--match", "hw=jetson"),
]


@pytest.mark.parametrize("args", ERRORS, ids=" ".join)
def test_a_refused_command_says_the_same_line_through_the_api(fleet, args):
    res = _same(fleet, *args)
    assert res.returncode == 2 and res.stderr.startswith("error: ") \
        and res.stderr.count("\n") == 1, res.stderr


def test_a_rollout_started_through_the_api_reaches_the_devices(fleet):
    assert fleet["rolled"].returncode == 0, fleet["rolled"].stderr + fleet["rolled"].stdout
    rid = str(fleet["rollout"])
    status = _same(fleet, "rollout", "status", rid, "--json")
    assert json.loads(status.stdout)["state"] == "completed"
    _same(fleet, "rollout", "status", rid, "--wide")
    text = _same(fleet, "rollout", "status", rid)
    assert fleet["rolled"].stdout.rstrip().endswith(text.stdout.rstrip())
    for device_id in DEVICES:
        assert fleet["lab"].agent_status(device_id)[0]["sha256"] == sha256_file(fleet["v1"])
    refused = _same(fleet, "rollout", "pause", rid)
    assert refused.returncode == 2 and "cannot pause" in refused.stderr
    watched = _same(fleet, "rollout", "status", rid, "--watch")  # ended: one line, at once
    assert "completed" in watched.stdout
    audit = json.loads(local(fleet, "audit", "--json").stdout)
    actors = {e["action"]: e["actor"] for e in audit}
    assert actors["model.add"] == "api:admin-1" and actors["rollout.create"] == "api:operator-1"


def test_device_variants_says_which_variant_a_device_got_and_why(fleet):
    out = json.loads(_same(fleet, "device", "variants", "cam-1", "--json").stdout)
    (m,) = out["models"]
    assert (m["model"], m["version"], m["rollout_id"], m["variant"], m["chosen_now"]) == \
        ("detector", "v1", fleet["rollout"], "default", "default")
    assert m["why"] == "by format (no --prefer): the variant it runs"
    assert m["delivery"].startswith("no version of the model on the device: full sent")


def test_model_add_through_the_api_uploads_and_prints_what_local_add_prints(fleet):
    assert fleet["added"].startswith("added detector:v1 variant default (onnx, fp32, ")
    mine = local(fleet, "model", "add", "local-twin", "v1", str(fleet["v1"]))
    assert mine.returncode == 0, mine.stderr
    assert fleet["added"] == mine.stdout.replace("local-twin", "detector")
    again = remote(fleet, "model", "add", "detector", "v1", str(fleet["v1"]), role="admin")
    assert again.returncode == 2 and again.stderr == \
        local(fleet, "model", "add", "detector", "v1", str(fleet["v1"])).stderr


def test_rollout_actions_and_wait_go_through_the_api(fleet):
    up = remote(fleet, "model", "add", "detector", "v2", str(fleet["v2"]), role="admin")
    assert up.returncode == 0, up.stderr
    started = remote(fleet, "rollout", "model", "detector:v2", "-g", "cams", "--canary", "1",
                     "--health-window", "60s", "--wait", "--timeout", "2s")
    assert started.returncode == 1, started.stderr  # --wait: not completed, so exit 1
    assert "timed out after 2 s; the rollout goes on" in started.stdout
    rid = re.match(r"rollout (\d+) started", started.stdout).group(1)
    paused = remote(fleet, "rollout", "pause", rid, "--json")
    assert (paused.returncode, json.loads(paused.stdout)) == \
        (0, {"id": int(rid), "state": "paused", "changed": True})
    assert _same(fleet, "rollout", "pause", rid).stdout == \
        f"rollout {rid} is already paused; nothing to do\n"
    assert remote(fleet, "rollout", "resume", rid).returncode == 0
    aborted = remote(fleet, "rollout", "abort", rid)
    assert aborted.returncode == 0, aborted.stderr
    assert aborted.stdout == f"rollout {rid}: abort requested; state is now aborting\n"
    wait_for(lambda: json.loads(remote(fleet, "rollout", "status", rid, "--json").stdout)
             ["state"] == "aborted", 30, "the abort to finish")
    _same(fleet, "rollout", "status", rid)
    assert json.loads(_same(fleet, "rollout", "abort", rid, "--json").stdout)["changed"] is False


def test_an_admin_manages_tokens_through_the_api(fleet):
    made = remote(fleet, "token", "create", "ci-remote", "--role", "viewer", "--json",
                  role="admin")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["token"].startswith("dft_")
    assert same_as(fleet, "admin", "token", "list").returncode == 0
    assert same_as(fleet, "admin", "token", "list", "--json").returncode == 0
    revoked = remote(fleet, "token", "revoke", "ci-remote", role="admin")
    assert (revoked.returncode, revoked.stdout) == (0, "revoked token ci-remote\n")
    assert same_as(fleet, "admin", "token", "revoke", "ci-remote").stdout == \
        "token ci-remote was already revoked\n"
    refused = remote(fleet, "token", "list")  # an operator
    assert refused.returncode == 2 and "operator" in refused.stderr, refused.stderr


def test_a_viewer_tokens_pause_exits_2_with_the_apis_line(fleet):
    res = remote(fleet, "rollout", "pause", str(fleet["rollout"]), role="viewer")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: ") and "viewer" in res.stderr
    assert res.stderr.count("\n") == 1


def test_a_bad_token_exits_2_with_one_line(fleet):
    res = remote(fleet, "device", "list", env={"FLEET_API_TOKEN": "dft_nope"})
    assert res.returncode == 2 and res.stderr.startswith("error: ") \
        and res.stderr.count("\n") == 1, res.stderr
    none = remote(fleet, "device", "list", env={"FLEET_API_TOKEN": ""})
    assert none.returncode == 2 and "FLEET_API_TOKEN" in none.stderr


def test_a_token_file_and_the_root_options_work_like_the_environment(fleet, tmp_path):
    token = tmp_path / "token"
    token.write_text(fleet["tokens"]["viewer"] + "\n")
    res = remote(fleet, "--api-url", fleet["url"], "--token-file", str(token), "model", "list",
                 env={"FLEET_API_TOKEN": "", "FLEET_API_URL": ""})
    assert (res.returncode, res.stdout) == (0, local(fleet, "model", "list").stdout)


def test_a_wrong_url_exits_1_with_one_line(fleet):
    url = f"http://127.0.0.1:{free_port()}"
    res = remote(fleet, "device", "list", env={"FLEET_API_URL": url})
    assert res.returncode == 1
    assert res.stderr == f"error: cannot reach the API at {url}: connection refused\n"
    plain = fleet["url"].replace("https://", "http://")  # plain HTTP to the TLS listener
    res = remote(fleet, "device", "list", env={"FLEET_API_URL": plain})
    assert res.returncode == 1 and res.stdout == "", res.stderr
    assert res.stderr.startswith(f"error: cannot reach the API at {plain}: ") \
        and res.stderr.count("\n") == 1, res.stderr


def test_an_unknown_ca_exits_1_with_one_line(fleet):
    res = remote(fleet, "device", "list", env={"FLEET_API_CA": ""})
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert "certificate verify failed" in res.stderr and "FLEET_API_CA" in res.stderr


LOCAL_ONLY = [
    ("init",), ("db", "upgrade"), ("keys", "init"), ("broker", "config"), ("server",),
    ("delta", "build", "detector:v1", "detector:v2"), ("store", "verify"),
    ("profile", "list"), ("profile", "show", "x86_64/cpu/8GiB"),
]


@pytest.mark.parametrize("args", LOCAL_ONLY, ids=" ".join)
def test_a_command_without_an_endpoint_refuses_with_the_api_set(fleet, args):
    res = remote(fleet, *args)
    assert res.returncode == 2, res
    assert res.stderr.startswith("error: `fleetctl ") and \
        res.stderr.endswith("works on the server's host only; unset FLEET_API_URL\n")
    assert not (fleet["root"] / "no-such-home").exists()  # no local store was made
