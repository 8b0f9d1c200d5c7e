"""`fleetctl delta list/show` through FLEET_API_URL print what they print on the server's
host (``api_fleet``: a real `fleetctl server` with its HTTPS API, a real Mosquitto, two
agents running detector:v1): a delta built with `fleetctl delta build` (state built, its ratio
to the compressed full model) and a pair the running server failed to build for a rollout
(state failed, with the reason); `delta build` refuses there in one line."""

from __future__ import annotations

import json

import pytest

from deltafleet.server.cli.remote import ApiClient, ApiConfig
from tests.harness.fleetlab import wait_for
from tests.harness.modelgen import make_incompressible_onnx_model
from tests.harness.remote_cli import local, remote, same

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _local_json(fleet, *args: str) -> list[dict]:
    res = local(fleet, *args, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def fleet(api_fleet, tmp_path_factory: pytest.TempPathFactory):
    """detector:v2 (a fine-tune of v1) with a delta v1 -> v2 built by hand, and detector:v3
    (noise no delta can beat) rolled out to the agents running v1: the server tries v1 -> v3
    and gives up."""
    fleet = api_fleet
    up = remote(fleet, "model", "add", "detector", "v2", str(fleet["v2"]), role="admin")
    assert up.returncode == 0, up.stderr
    built = local(fleet, "delta", "build", "detector:v1", "detector:v2", "--json")
    assert built.returncode == 0, built.stderr
    fleet["built"] = json.loads(built.stdout)
    noise = make_incompressible_onnx_model(tmp_path_factory.mktemp("noise") / "noise.onnx",
                                           size_mb=0.2)
    up = remote(fleet, "model", "add", "detector", "v3", str(noise), role="admin")
    assert up.returncode == 0, up.stderr
    started = remote(fleet, "rollout", "model", "detector:v3", "-g", "cams", "--json")
    assert started.returncode == 0, started.stderr
    rid = str(json.loads(started.stdout)["id"])
    wait_for(lambda: any(d["state"] == "failed" for d in _local_json(fleet, "delta", "list")),
             90, "the server to give up on the delta v1 -> v3")
    assert remote(fleet, "rollout", "abort", rid).returncode == 0
    return fleet


READS = [
    ("delta", "list"), ("delta", "list", "--json"), ("delta", "list", "--wide"),
    ("delta", "list", "--model", "detector", "--json"), ("delta", "list", "--model", "detector"),
    ("delta", "show", "1"), ("delta", "show", "1", "--json"), ("delta", "show", "1", "--wide"),
]


@pytest.mark.parametrize("args", READS, ids=" ".join)
def test_a_delta_read_prints_the_same_through_the_api(fleet, args):
    assert same(fleet, *args).returncode == 0


@pytest.mark.parametrize("args", [("delta", "show", "999"),
                                  ("delta", "list", "--model", "nope")], ids=" ".join)
def test_a_refused_delta_read_says_the_same_line_through_the_api(fleet, args):
    res = same(fleet, *args)
    assert res.returncode == 2 and res.stderr.startswith("error: ") \
        and res.stderr.count("\n") == 1, res.stderr


def test_a_built_delta_shows_base_target_codec_and_its_ratio_to_the_full_artifact(fleet):
    (shown,) = [d for d in _local_json(fleet, "delta", "list") if d["state"] == "built"]
    assert shown == {k: v for k, v in fleet["built"].items() if k not in ("cached", "attempts")}
    assert (shown["base"], shown["target"]) == ("detector:v1/default", "detector:v2/default")
    assert shown["codec"] and shown["worth_sending"] is True and shown["reason"] is None
    assert shown["full_artifact_codec"] == "zstd"
    assert shown["ratio"] == round(shown["size_bytes"] / shown["full_artifact_bytes"], 4)
    assert json.loads(remote(fleet, "delta", "show", str(shown["id"]), "--json").stdout) == shown


def test_a_pair_the_server_could_not_build_is_listed_failed_with_why(fleet):
    (failed,) = [d for d in _local_json(fleet, "delta", "list") if d["state"] == "failed"]
    assert (failed["base"], failed["target"]) == ("detector:v1/default", "detector:v3/default")
    assert failed["id"] is None and failed["codec"] is None and failed["reason"]
    text = remote(fleet, "delta", "list")
    assert text.returncode == 0 and "failed" in text.stdout and failed["reason"][:30] in \
        " ".join(text.stdout.split())


def test_the_api_pages_and_filters_deltas(fleet):
    api = ApiClient(ApiConfig(url=fleet["url"], base=fleet["url"] + "/api/v1",
                              token=fleet["tokens"]["viewer"], ca_file=fleet["ca"]))
    page = api.get("/deltas", {"limit": 1, "offset": 1})
    assert (page["total"], page["limit"], page["offset"], len(page["items"])) == (2, 1, 1, 1)
    assert [d["state"] for d in api.get("/deltas", {"state": "failed"})["items"]] == ["failed"]
    assert api.get("/deltas", {"model": "detector", "state": "built"})["total"] == 1


def test_delta_build_works_on_the_servers_host_only(fleet):
    res = remote(fleet, "delta", "build", "detector:v2", "detector:v3")
    assert (res.returncode, res.stdout) == (2, "")
    assert res.stderr == "error: `fleetctl delta build` works on the server's host only; " \
                         "unset FLEET_API_URL\n"
