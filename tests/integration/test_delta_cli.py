"""fleetctl delta build / list / show on a real FLEET_HOME with two registered versions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from deltafleet import codecs
from deltafleet.server.store import Store
from deltafleet.server.store.models import Artifact, Delta
from deltafleet.shared import sha256_file
from scripts.bench.delta import make_pair
from tests.harness.cli import assert_one_line_error, fleetctl


@pytest.fixture
def home(fleet_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FLEET_ACTOR", "tester")
    assert fleetctl("init").exit_code == 0
    v1, v2 = make_pair("finetune", tmp_path / "models", size_mb=0.5)
    assert fleetctl("model", "add", "det", "v1", str(v1)).exit_code == 0
    assert fleetctl("model", "add", "det", "v2", str(v2)).exit_code == 0
    return fleet_home


def test_delta_build_stores_the_winner_like_the_daemon(home: Path) -> None:
    result = fleetctl("delta", "build", "det:v1", "det:v2/default", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["codec"] == "tensor-xor" and data["worth_sending"] is True
    assert data["full_artifact_codec"] == "zstd"  # a delta is weighed against what ships
    assert data["full_artifact_bytes"] < data["target_size_bytes"]
    assert data["ratio"] == round(data["size_bytes"] / data["full_artifact_bytes"], 4)
    assert data["base"] == "det:v1/default" and data["target"] == "det:v2/default"
    with Store(f"sqlite:///{home}/fleet.db") as store, store.session() as s:
        delta = s.scalars(select(Delta)).one()
        artifact = s.get(Artifact, delta.artifact_sha256)
        assert artifact is not None and artifact.kind == "delta"
        assert artifact.size_bytes == delta.size_bytes == data["size_bytes"]
    blob = home / "blobs" / delta.artifact_sha256[:2] / delta.artifact_sha256
    assert sha256_file(blob) == delta.artifact_sha256
    base_blob = home / "blobs" / delta.base_sha256[:2] / delta.base_sha256
    assert codecs.decode_sha256(delta.codec, blob, base_blob)[0] == delta.target_sha256
    assert list((home / "work").glob(".delta.*")) == []


def test_building_twice_reuses_the_cached_delta(home: Path) -> None:
    assert fleetctl("delta", "build", "det:v1", "det:v2").exit_code == 0
    again = fleetctl("delta", "build", "det:v1", "det:v2", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["cached"] is True


def test_delta_list_and_show(home: Path) -> None:
    built = json.loads(fleetctl("delta", "build", "det:v1", "det:v2", "--json").stdout)
    listed = fleetctl("delta", "list", "--json")
    assert listed.exit_code == 0
    assert [d["id"] for d in json.loads(listed.stdout)] == [built["id"]]
    shown = fleetctl("delta", "show", str(built["id"]), "--json")
    assert shown.exit_code == 0
    assert json.loads(shown.stdout)["artifact_sha256"] == built["artifact_sha256"]
    table = fleetctl("delta", "list")
    assert table.exit_code == 0 and "tensor-xor" in table.stdout
    assert fleetctl("delta", "show", str(built["id"])).exit_code == 0


@pytest.mark.parametrize(
    "args",
    [
        ("build", "det:v1", "det:v9"),
        ("build", "det:v1/", "det:v2"),
        ("build", "det:v1/nope", "det:v2"),
        ("build", "other:v1", "det:v2"),
        ("build", "det:v1", "det:v1"),
        ("show", "999"),
    ],
)
def test_bad_input_exits_2_with_one_line(home: Path, args: tuple[str, ...]) -> None:
    assert_one_line_error(fleetctl("delta", *args))
