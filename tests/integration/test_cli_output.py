"""fleetctl reads well: every list/show command at 80 columns and piped (no TTY) prints each
key field (device, model, version, state) whole and fits the width; usage errors are one line
with the help to read and exit 2; ``device list`` loads none of the heavy modules.

fleetctl runs as a user runs it: the installed console script in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.rollout_lab import RolloutLab

pytestmark = pytest.mark.broker

FLEETCTL = Path(sys.executable).with_name("fleetctl")
FAST = {"health_window_s": 1, "retry_backoff_s": 1, "state_timeout_s": 60}
LONG_ID = "jetson-orin-berlin-hall7-0001"


def exe() -> list[str]:
    return [str(FLEETCTL)] if FLEETCTL.exists() else [
        sys.executable, "-c", "from deltafleet.server.cli import main; main()"]


@pytest.fixture(scope="module")
def fleet_home(tmp_path_factory, broker, onnx_pair) -> dict[str, str]:
    """A lab after one rollout where one device (with a long id) failed its trial."""
    root = tmp_path_factory.mktemp("cli-output")
    lab = RolloutLab(root, broker.url, onnx_pair(0.3))
    try:
        lab.start_server()
        lab.add_devices(2, {"hw": "jetson", "site": "berlin-hall-7-north-wing"})
        (bad,) = lab.add_devices(1, {"hw": "xavier"}, prefix=LONG_ID[:-4])
        lab.fleet.devices[bad].knobs.fail_health = True
        with lab.store.session() as s:
            from deltafleet.server import fleet  # noqa: PLC0415

            fleet.create_group(s, "edge", {"hw": ["jetson", "xavier"]})
        rid = lab.rollout("v2", "edge", max_attempts=1, max_failure_pct=50.0, **FAST)
        lab.wait_state(rid, {"completed"}, 90)
        home = {"FLEET_HOME": str(lab.cfg.home), "FLEET_DB_URL": lab.cfg.db_url,
                "rid": str(rid), "bad": bad}
        assert run(home, "keys", "init").returncode == 0
        assert run(home, "token", "create", "release-pipeline-berlin", "--role",
                   "operator").returncode == 0
        yield home
    finally:
        lab.close()


def run(home: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLEET_HOME": home["FLEET_HOME"], "FLEET_DB_URL": home["FLEET_DB_URL"],
           "COLUMNS": "80", "FLEET_ACTOR": "tester"}
    return subprocess.run([*exe(), *args], capture_output=True, text=True, env=env, timeout=60,
                          stdin=subprocess.DEVNULL)


def commands(home: dict[str, str]) -> dict[tuple[str, ...], set[str]]:
    """Each command and the key fields it must print whole (as whitespace-separated words)."""
    devices = {"sim-000", "sim-001", home["bad"]}
    return {
        ("device", "list"): devices | {"detector:v1", "detector:v2", "rolled_back"},
        ("device", "show", home["bad"]): {home["bad"], "detector", "v1", "v2", "rolled_back"},
        ("group", "list"): {"edge"},
        ("group", "show", "edge"): devices | {"detector:v1", "detector:v2", "rolled_back"},
        ("model", "list"): {"detector", "v1", "v2", "default"},
        ("model", "show", "detector"): {"detector:v1", "detector:v2"},
        ("delta", "list"): {"detector:v1/default", "detector:v2/default", "tensor-xor"},
        ("rollout", "list"): {"1", "detector", "v2", "edge", "completed"},
        ("rollout", "status", home["rid"]): devices | {"healthy", "rolled_back"},
        ("rollout", "plan", "v2", "--group", "edge"): devices | {"v1", "v2"},
        ("audit",): {"test", "rollout.create", "rollout/1"},
        ("keys", "show"): set(),
        ("device", "history", home["bad"]): {"detector", "v2", "rolled_back"},
        ("delta", "show", "1"): {"detector:v1/default", "detector:v2/default"},
        ("profile", "list"): set(),
        ("device", "labels", "sim-000"): {"site", "berlin-hall-7-north-wing"},
        ("token", "list"): {"release-pipeline-berlin", "operator"},
    }


def test_every_list_command_fits_80_columns_piped_with_key_fields_whole(fleet_home) -> None:
    for args, keys in commands(fleet_home).items():
        res = run(fleet_home, *args)
        assert res.returncode == 0, (args, res.stderr)
        lines = res.stdout.splitlines()
        assert lines and all(len(line) <= 80 for line in lines), (args, res.stdout)
        words = {w.strip(",;()") for w in res.stdout.split()}
        assert keys <= words, (args, keys - words, res.stdout)


def test_every_list_and_show_command_takes_wide(fleet_home) -> None:
    """--wide on every table command: exit 0 and at least what the 80-column view shows."""
    for args, keys in commands(fleet_home).items():
        if args[0] == "audit" or args[:2] == ("rollout", "plan"):
            continue
        res = run(fleet_home, *args, "--wide")
        assert res.returncode == 0, (args, res.stderr)
        words = {w.strip(",;()") for w in res.stdout.split()}
        names = {k for k in keys if k not in ("rolled_back", "healthy")}  # wide: sentences
        assert names <= words, (args, names - words, res.stdout)


def test_the_failed_device_is_shown_with_its_state_whole(fleet_home) -> None:
    out = run(fleet_home, "rollout", "status", fleet_home["rid"]).stdout
    (line,) = [x for x in out.splitlines() if x.startswith(fleet_home["bad"])]
    assert " rolled_back " in f"{line} "
    wide = run(fleet_home, "rollout", "status", fleet_home["rid"], "--wide").stdout
    assert "injected health failure: error rate 40%" in wide
    listed = run(fleet_home, "device", "list").stdout
    (line,) = [x for x in listed.splitlines() if x.startswith(fleet_home["bad"])]
    assert "detector:v1" in line and f"v2 r{fleet_home['rid']} rolled_back" in line


def test_group_show_lists_the_members_of_an_any_of_selector(fleet_home) -> None:
    res = run(fleet_home, "group", "show", "edge", "--json")
    data = json.loads(res.stdout)
    assert data["selector"] == {"hw": ["jetson", "xavier"]}
    assert data["devices"] == sorted(["sim-000", "sim-001", fleet_home["bad"]])
    assert [m["id"] for m in data["members"]] == data["devices"]
    text = run(fleet_home, "group", "show", "edge").stdout
    assert text.startswith("group edge: hw in (jetson, xavier); 3 device(s)")


@pytest.mark.parametrize("args", [
    ("device", "show"), ("device", "list", "--bogus"), ("nope",), ("rollout", "status", "abc"),
    ("group", "create", "g", "--match", "hw in ()"), ("rollout", "list", "--wide", "x"),
])
def test_usage_errors_are_one_line_with_a_hint_and_exit_2(fleet_home, args) -> None:
    res = run(fleet_home, *args)
    assert res.returncode == 2, res
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    assert "╭" not in res.stderr and "Traceback" not in res.stderr
    if args[0] != "group":
        assert "--help'" in res.stderr


def test_device_list_loads_no_heavy_module(fleet_home) -> None:
    code = ("import atexit, json, sys\n"
            "atexit.register(lambda: print(json.dumps(sorted({m.split('.')[0] for m in "
            "sys.modules} & {'onnx', 'alembic', 'numpy', 'zstandard', 'rich'})), "
            "file=sys.stderr))\n"
            "sys.argv = ['fleetctl', 'device', 'list']\n"
            "from deltafleet.server.cli import main\nmain()\n")
    env = {**os.environ, "FLEET_HOME": fleet_home["FLEET_HOME"],
           "FLEET_DB_URL": fleet_home["FLEET_DB_URL"]}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stderr.strip().splitlines()[-1]) == []
