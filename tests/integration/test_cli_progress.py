"""Long work shows progress, run as a user runs it (the installed console scripts in a
subprocess, stdout a pipe): ``rollout model --wait`` and ``rollout status --watch`` print one
stamped line per change and end with the documented exit code; ``delta build`` and ``model
add`` of a large model print their steps on stderr; an empty home says to run `fleetctl init`;
``fleet-agent run --trusted-key`` with a wrong file exits 2 with one line naming it; the demo
says in one line which step failed and why."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deltafleet.shared import SigningKey
from tests.harness.fleetlab import Lab
from tests.harness.modelgen import make_onnx_model
from tests.harness.rollout_lab import RolloutLab

pytestmark = pytest.mark.broker

BIN = Path(sys.executable).parent
LINE = re.compile(r"^\d\d:\d\d:\d\d rollout (\d+) (\w+) wave (\d+)/(\d+): (.+), "
                  r"(\d+(?:\.\d)? (?:B|KiB|MiB|GiB)) sent(?: \(.*\))?$")
STAMPED = re.compile(r"^\d\d:\d\d:\d\d ")
FAST = ("--health-window", "1s", "--retry-backoff", "1s", "--state-timeout", "60s")


@pytest.fixture
def lab(rollout_lab, onnx_pair) -> RolloutLab:
    return rollout_lab(onnx_pair(0.3))


def env_of(lab: RolloutLab) -> dict[str, str]:
    return {**os.environ, "FLEET_HOME": str(lab.cfg.home), "FLEET_DB_URL": lab.cfg.db_url,
            "COLUMNS": "80", "FLEET_ACTOR": "tester"}


def fleetctl(lab: RolloutLab, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fleetctl"), *args], capture_output=True, text=True,
                          env=env_of(lab), timeout=timeout_s, stdin=subprocess.DEVNULL)


def progress_lines(out: str) -> list[re.Match[str]]:
    """The stamped progress lines of ``out``; each must be a whole, well-formed line."""
    stamped = [x for x in out.splitlines() if STAMPED.match(x)]
    matches = [LINE.match(x) for x in stamped]
    assert all(matches), stamped
    return [m for m in matches if m]


def assert_one_per_change(lines: list[re.Match[str]]) -> None:
    texts = [m.group(0)[9:] for m in lines]  # without the stamp
    assert all(a != b for a, b in zip(texts, texts[1:], strict=False)), texts


def test_rollout_wait_piped_prints_one_line_per_change_and_exits_0(lab) -> None:
    lab.add_devices(4, {"hw": "jetson"})
    lab.group("jetson", hw="jetson")
    proc = subprocess.Popen(
        [str(BIN / "fleetctl"), "rollout", "model", "v2", "--group", "jetson", "--canary", "1",
         "--waves", "50%,100%", *FAST, "--wait", "--timeout", "90s"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_of(lab),
        stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "rollout 1 started"
    first = proc.stdout.readline()  # flushed per line: it arrives while the rollout runs
    assert proc.poll() is None and LINE.match(first.strip()), first
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (rest, err)
    out = first + rest
    assert "\x1b" not in out and "\r" not in out
    lines = progress_lines(out)
    assert_one_per_change(lines)
    assert lines[0].group(2) == "running" and lines[-1].group(2) == "completed"
    assert lines[-1].group(4) == "3" and "4 healthy" in lines[-1].group(5)
    assert {m.group(3) for m in lines} >= {"1", "3"}  # the waves went by
    # the status table still ends the output, with every device
    assert out.rstrip().splitlines()[-1].startswith("bytes sent")


def test_rollout_wait_piped_ends_with_exit_1_when_the_rollout_pauses(lab) -> None:
    ids = lab.add_devices(3, {"hw": "jetson"})
    lab.group("jetson", hw="jetson")
    lab.fleet.devices[ids[0]].knobs.fail_apply = True
    res = fleetctl(lab, "rollout", "model", "v2", "--group", "jetson", "--canary", "1",
                   "--max-attempts", "1", *FAST, "--wait", "--timeout", "90s")
    assert res.returncode == 1, res
    lines = progress_lines(res.stdout)
    assert_one_per_change(lines)
    assert lines[-1].group(2) == "paused" and "1 failed" in lines[-1].group(5), lines[-1]


def test_rollout_wait_piped_timeout_says_so_and_exits_1(lab) -> None:
    lab.add_devices(1, {"hw": "jetson"})
    lab.group("jetson", hw="jetson")
    res = fleetctl(lab, "rollout", "model", "v2", "--group", "jetson", "--health-window",
                   "120s", "--wait", "--timeout", "2s")
    assert res.returncode == 1, res
    assert progress_lines(res.stdout)[-1].group(2) == "running"
    assert "timed out after 2 s; the rollout goes on" in res.stdout


def test_rollout_status_watch_piped_prints_a_line_per_change_until_the_end(lab) -> None:
    lab.add_devices(3, {"hw": "jetson"})
    lab.group("jetson", hw="jetson")
    lab.stop_server()  # so the watch sees the rollout from its start
    rid = lab.rollout("v2", "jetson", canary="1", health_window_s=1, state_timeout_s=60)
    proc = subprocess.Popen([str(BIN / "fleetctl"), "rollout", "status", str(rid), "--watch"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_of(lab), stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert LINE.match(first.strip()) and " 3 pending" in first, first
    lab.start_server()
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    lines = progress_lines(first + rest)
    assert first + rest == "".join(m.group(0) + "\n" for m in lines)  # lines, nothing else
    assert_one_per_change(lines)
    assert len(lines) >= 3 and lines[-1].group(2) == "completed"
    assert "3 healthy" in lines[-1].group(5)


def test_delta_build_piped_prints_each_codec_and_the_choice_on_stderr(lab) -> None:
    res = fleetctl(lab, "delta", "build", "detector:v1", "detector:v2")
    assert res.returncode == 0, res
    lines = res.stderr.splitlines()
    assert lines and all(STAMPED.match(x) for x in lines), res.stderr
    prefix = "delta detector:v1/default -> detector:v2/default: "
    assert all(x[9:].startswith(prefix) for x in lines), lines
    said = [x[9 + len(prefix):] for x in lines]
    assert any(re.match(r"tensor-xor \d+\.\d KiB \(\d+\.\d s\)$", x) for x in said), said
    assert re.match(r"chose \S+ \d+\.\d KiB \(\d+\.\d s\)$", said[-1]), said
    assert res.stdout.startswith("built delta 1: ")


def test_model_add_of_a_large_model_piped_prints_its_steps(lab, tmp_path: Path) -> None:
    big = make_onnx_model(tmp_path / "big.onnx", seed=3, size_mb=2.5)
    res = fleetctl(lab, "model", "add", "detector", "v3", str(big))
    assert res.returncode == 0, res
    lines = res.stderr.splitlines()
    assert all(STAMPED.match(x) and x[9:].startswith("model add detector:v3: ")
               for x in lines), res.stderr
    said = [x[9 + len("model add detector:v3: "):] for x in lines]
    assert re.match(r"inspected and hashed 2\.\d MiB \(\d+\.\d s\)$", said[0]), said
    assert re.match(r"stored 2\.\d MiB", said[1]), said
    assert any(x.startswith(("compressed to ", "compression does not")) for x in said), said
    assert re.match(r"done \(\d+\.\d s\)$", said[-1]), said
    assert res.stdout.startswith("added detector:v3 variant default")
    small = make_onnx_model(tmp_path / "small.onnx", seed=4, size_mb=0.1)
    res = fleetctl(lab, "model", "add", "detector", "v4", str(small))
    assert res.returncode == 0 and res.stderr == "", res  # a small model: just its result


@pytest.mark.parametrize("args", [
    ("device", "list"), ("device", "show", "d1"), ("model", "list"), ("model", "show", "m"),
    ("model", "compress"), ("group", "list"), ("group", "create", "g", "--match", "hw=x"),
    ("rollout", "list"), ("rollout", "status", "1"), ("rollout", "model", "v2", "--group", "g"),
    ("rollout", "plan", "v2", "--group", "g"), ("rollout", "pause", "1"), ("delta", "list"),
    ("delta", "build", "m:v1", "m:v2"), ("audit",), ("server",),
])
def test_an_empty_home_says_to_run_fleetctl_init(tmp_path: Path, args) -> None:
    home = tmp_path / "never-initialised"
    env = {k: v for k, v in os.environ.items() if k != "FLEET_DB_URL"}
    res = subprocess.run([str(BIN / "fleetctl"), *args], capture_output=True, text=True,
                         env={**env, "FLEET_HOME": str(home)}, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 2, res
    assert res.stderr.count("\n") == 1 and "run `fleetctl init`" in res.stderr, res.stderr
    assert not home.exists()


# -- fleet-agent ---------------------------------------------------------------------------

def wrong_keys(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Wrong --trusted-key files and what the one line must say about each."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    good = SigningKey.generate()
    good.save(tmp_path / "signing.key", tmp_path / "signing.pub")
    (tmp_path / "garbage.pem").write_bytes(os.urandom(300))
    (tmp_path / "empty.pem").write_bytes(b"")
    (tmp_path / "cut.pub").write_bytes((tmp_path / "signing.pub").read_bytes()[:60])
    ec_pub = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "ec.pub").write_bytes(ec_pub)
    (tmp_path / "keydir").mkdir()
    return {
        "missing": (tmp_path / "nope.pub", "no such file"),
        "directory": (tmp_path / "keydir", "is a directory"),
        "private key": (tmp_path / "signing.key", "is a private key"),
        "garbage": (tmp_path / "garbage.pem", "is not a PEM public key"),
        "empty": (tmp_path / "empty.pem", "is empty"),
        "cut short": (tmp_path / "cut.pub", "is not a valid PEM public key"),
        "not ed25519": (tmp_path / "ec.pub", "is not an Ed25519 key"),
    }


def test_a_wrong_trusted_key_file_exits_2_with_one_line_naming_it(tmp_path: Path) -> None:
    for kind, (path, says) in wrong_keys(tmp_path).items():
        state = tmp_path / f"state-{kind.replace(' ', '-')}"
        res = subprocess.run(
            [str(BIN / "fleet-agent"), "run", "--device-id", "d1", "--state-dir", str(state),
             "--broker", "mqtt://127.0.0.1:1", "--api-port", "0", "--trusted-key", str(path)],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert res.returncode == 2, (kind, res)
        assert res.stderr.count("\n") == 1, (kind, res.stderr)
        assert res.stderr.startswith(f"error: trusted key {path}: {says}"), (kind, res.stderr)
        assert "expected the server's Ed25519 signing public key" in res.stderr
        assert not state.exists(), kind  # refused before anything is written


def test_a_wrong_trusted_key_in_the_environment_is_refused_the_same_way(tmp_path: Path) -> None:
    path, says = wrong_keys(tmp_path)["private key"]
    res = subprocess.run(
        [str(BIN / "fleet-agent"), "run", "--device-id", "d1", "--state-dir",
         str(tmp_path / "state"), "--broker", "mqtt://127.0.0.1:1", "--api-port", "0"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        env={**os.environ, "FLEET_AGENT_TRUSTED_KEYS": str(path)})
    assert res.returncode == 2 and res.stderr.startswith(f"error: trusted key {path}: {says}")
    assert res.stderr.count("\n") == 1


@pytest.mark.parametrize("args", [
    (), ("bogus",), ("run", "--api-port", "abc"), ("run", "--log-level", "loud"),
    ("run", "--label", "nokv", "--trusted-key", "/dev/null"), ("status", "--bogus"),
    ("status", "--state-dir", "/nonexistent/state"),
])
def test_agent_usage_errors_are_one_line_and_exit_2(args) -> None:
    res = subprocess.run([str(BIN / "fleet-agent"), *args], capture_output=True, text=True,
                         timeout=30, stdin=subprocess.DEVNULL)
    assert res.returncode == 2, res
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    assert "usage:" not in res.stderr and "Traceback" not in res.stderr


# -- the demo ------------------------------------------------------------------------------

def test_the_demo_says_in_one_line_which_step_failed_and_why(tmp_path: Path, broker) -> None:
    """The demo's agent step against a broken setup: agents given a garbage key."""
    from scripts import demo  # noqa: PLC0415

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    lab = Lab(tmp_path / "lab", mqtt_url=broker.url)
    try:
        lab.fleetctl("init")
        lab.start_server()
        with pytest.raises(demo.DemoFailed) as failed, demo.step("start 3 agents"):
            for device_id, hw in demo.DEVICES.items():
                lab.start_agent(device_id, {"hw": hw}, trusted_key=garbage)
            demo.wait_online(lab, list(demo.DEVICES), timeout_s=30)
    finally:
        lab.close()
    line = str(failed.value)
    assert "\n" not in line
    assert re.match(r'demo failed at step "start 3 agents": agent (jetson-1|jetson-2|rpi-1) '
                    rf"exited 2: error: trusted key {re.escape(str(garbage))}: is not a PEM "
                    "public key", line), line


def test_the_demo_names_the_devices_still_offline_when_time_runs_out(tmp_path: Path) -> None:
    """An agent that runs but never reaches the server: the line says who and what it said."""
    from scripts import demo  # noqa: PLC0415

    lab = Lab(tmp_path / "lab", mqtt_url="mqtt://127.0.0.1:1")  # nothing listens there
    try:
        lab.fleetctl("init")
        lab.start_agent("rpi-1", {"hw": "rpi"})
        with pytest.raises(demo.DemoFailed) as failed, demo.step("start 1 agents"):
            demo.wait_online(lab, ["rpi-1"], timeout_s=3)
    finally:
        lab.close()
    line = str(failed.value)
    assert line.startswith('demo failed at step "start 1 agents": rpi-1 not online after 3 s; '
                           "agent rpi-1 last said: "), line
    assert "connection refused" in line and "\n" not in line


def test_make_demo_with_a_wrong_agent_key_fails_with_one_line(tmp_path: Path, broker) -> None:
    """``python -m scripts.demo --trusted-key FILE`` as a user runs it: exit 1, one line."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    res = subprocess.run([sys.executable, "-m", "scripts.demo", "--trusted-key", str(garbage)],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                         cwd=Path(__file__).parents[2],
                         env={**os.environ, "FLEET_MQTT_URL": broker.url})
    assert res.returncode == 1, res
    assert res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith('demo failed at step "start 3 agents": agent '), res.stderr
    assert f"trusted key {garbage}: is not a PEM public key" in res.stderr
    assert "Traceback" not in res.stdout + res.stderr


def test_rollout_status_watch_stops_quietly_when_the_reader_leaves(lab) -> None:
    """``fleetctl rollout status ID --watch | head -1``: no traceback when the pipe closes."""
    lab.add_devices(2, {"hw": "jetson"})
    lab.group("jetson", hw="jetson")
    lab.stop_server()
    rid = lab.rollout("v2", "jetson", health_window_s=1, state_timeout_s=60)
    proc = subprocess.Popen([str(BIN / "fleetctl"), "rollout", "status", str(rid), "--watch"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_of(lab), stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    assert LINE.match(proc.stdout.readline().strip())
    proc.stdout.close()  # like `head -1` exiting
    lab.start_server()  # the next change is written to a closed pipe
    assert proc.wait(120) == 0
    assert proc.stderr.read() == ""
