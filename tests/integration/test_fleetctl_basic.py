"""fleetctl basics: init, model add/list, group create; bad input exits 2 with one line."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from deltafleet.server.store import Store
from deltafleet.server.store.models import Base
from tests.harness import modelgen
from tests.harness.cli import assert_one_line_error, fleetctl

REPO = Path(__file__).resolve().parents[2]
FLEETCTL = REPO / ".venv" / "bin" / "fleetctl"


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(modelgen.make_onnx_model(tmp_path_factory.mktemp("m") / "det.onnx",
                                         size_mb=0.05))


@pytest.fixture
def home(fleet_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLEET_ACTOR", "tester")
    result = fleetctl("init")
    assert result.exit_code == 0, result.output
    return fleet_home


def snapshot(home: Path) -> tuple[dict[str, int], list[str]]:
    """Row counts of every table and every file under blobs/ (incl. temp files)."""
    with Store(f"sqlite:///{home}/fleet.db") as store, store.session() as s:
        rows = {t.name: s.scalar(select(func.count()).select_from(t)) or 0
                for t in Base.metadata.sorted_tables}
    blobs = home / "blobs"
    files = sorted(str(p.relative_to(blobs)) for p in blobs.rglob("*")) if blobs.exists() else []
    return rows, files


def test_init_creates_the_signing_key_with_mode_0600(home: Path) -> None:
    key = home / "keys" / "signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (home / "keys" / "signing.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY")
    assert (home / "fleet.db").exists()


def test_init_twice_keeps_the_key_and_does_nothing(home: Path) -> None:
    key = (home / "keys" / "signing.key").read_bytes()
    result = fleetctl("init")
    assert result.exit_code == 0
    assert "nothing to do" in result.stdout
    assert (home / "keys" / "signing.key").read_bytes() == key


def test_commands_refuse_an_uninitialised_home_without_creating_it(fleet_home: Path) -> None:
    result = fleetctl("model", "list")
    assert_one_line_error(result)
    assert "not initialised; run `fleetctl init`" in result.stderr
    assert not fleet_home.exists()


def test_added_model_is_listed_in_model_list_json(home: Path, onnx_file: Path) -> None:
    result = fleetctl("model", "add", "det", "v1", str(onnx_file))
    assert result.exit_code == 0, result.output
    listed = json.loads(fleetctl("model", "list", "--json").stdout)
    assert [m["name"] for m in listed] == ["det"]
    variant = listed[0]["versions"][0]["variants"][0]
    assert (variant["name"], variant["format"], variant["precision"]) == ("default", "onnx", "fp32")
    assert variant["size_bytes"] == onnx_file.stat().st_size
    assert (home / "blobs" / variant["sha256"][:2] / variant["sha256"]).is_file()
    packed = variant["compressed"]
    assert packed["codec"] == "zstd" and packed["size_bytes"] < variant["size_bytes"]
    assert (home / "blobs" / packed["sha256"][:2] / packed["sha256"]).is_file()


def test_model_show_prints_what_a_full_install_ships(home: Path, onnx_file: Path) -> None:
    fleetctl("model", "add", "det", "v1", str(onnx_file))
    packed = json.loads(fleetctl("model", "show", "det", "--json").stdout)[
        "versions"][0]["variants"][0]["compressed"]
    result = fleetctl("model", "show", "det")
    assert result.exit_code == 0, result.output
    assert "full install" in result.stdout and "zstd sha256" in result.stdout
    assert packed["sha256"][:32] in result.stdout


def test_model_show_json_has_the_io_signature(home: Path, onnx_file: Path) -> None:
    fleetctl("model", "add", "det", "v1", str(onnx_file))
    shown = json.loads(fleetctl("model", "show", "det", "--json").stdout)
    variant = shown["versions"][0]["variants"][0]
    assert variant["inputs"][0]["dtype"] == "float32"
    assert variant["outputs"]


def test_model_add_of_a_garbage_file_exits_2_and_changes_nothing(
    home: Path, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(4096))
    before = snapshot(home)
    assert_one_line_error(fleetctl("model", "add", "det", "v1", str(junk)))
    assert snapshot(home) == before


def test_model_add_of_a_duplicate_version_exits_2_and_changes_nothing(
    home: Path, onnx_file: Path, tmp_path: Path
) -> None:
    assert fleetctl("model", "add", "det", "v1", str(onnx_file)).exit_code == 0
    other = modelgen.make_onnx_model(tmp_path / "other.onnx", seed=7, size_mb=0.05)
    before = snapshot(home)
    result = fleetctl("model", "add", "det", "v1", str(other))
    assert_one_line_error(result)
    assert "already" in result.stderr
    assert snapshot(home) == before


def test_model_add_with_a_bad_name_exits_2_and_changes_nothing(
    home: Path, onnx_file: Path
) -> None:
    before = snapshot(home)
    result = fleetctl("model", "add", "Bad Name", "v1", str(onnx_file))
    assert_one_line_error(result)
    assert "invalid model name" in result.stderr
    assert snapshot(home) == before


def test_group_create_with_a_bad_match_exits_2(home: Path) -> None:
    before = snapshot(home)
    assert_one_line_error(fleetctl("group", "create", "jetson", "--match", "arch"))
    assert_one_line_error(fleetctl("group", "create", "jetson", "--match", "=aarch64"))
    assert snapshot(home) == before


def test_group_create_is_listed_and_audited(home: Path) -> None:
    result = fleetctl("group", "create", "jetson", "--match", "arch=aarch64")
    assert result.exit_code == 0, result.output
    groups = json.loads(fleetctl("group", "list", "--json").stdout)
    assert groups == [{"name": "jetson", "selector": {"arch": "aarch64"},
                       "created_at": groups[0]["created_at"], "devices": []}]
    entries = json.loads(fleetctl("audit", "--since", "1h", "--json").stdout)
    assert ("tester", "group.create", "jetson") in [
        (e["actor"], e["action"], e["subject"]) for e in entries
    ]


def test_audit_with_a_bad_since_exits_2(home: Path) -> None:
    assert_one_line_error(fleetctl("audit", "--since", "yesterday-ish"))


def test_installed_fleetctl_prints_one_line_error_and_exit_2(home: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00" * 64)
    exe = [str(FLEETCTL)] if FLEETCTL.exists() else [
        sys.executable, "-c", "from deltafleet.server.cli import main; main()"]
    proc = subprocess.run([*exe, "model", "add", "det", "v1", str(junk)],
                          capture_output=True, text=True, env=os.environ.copy(), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr + proc.stdout


def test_model_add_failing_after_the_blob_is_stored_removes_it_again(
    home: Path, onnx_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deltafleet.server import audit as audit_module
    from deltafleet.server.store import StoreError

    def broken_audit(*args: object, **kwargs: object) -> None:
        raise StoreError("database error: disk I/O error")

    monkeypatch.setattr(audit_module, "audit", broken_audit)  # `model add` imports it late
    before = snapshot(home)
    assert_one_line_error(fleetctl("model", "add", "det", "v1", str(onnx_file)), exit_code=1)
    assert snapshot(home)[0] == before[0]
    assert [f for f in snapshot(home)[1] if len(Path(f).name) == 64] == []
