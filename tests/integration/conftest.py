"""Fixtures shared by the integration tests, defined once.

- ``key``: an online signing key and the public key file agents trust;
- ``onnx_pair(size_mb)``: a fine-tune v1/v2 pair, made once per session and size (read-only);
  ``models`` is the 1 MB pair as a tuple, for the agent tests;
- ``lab`` / ``fresh_lab``: ``Lab`` agent processes on the session's broker / on a broker of
  the test's own (a module whose every test needs the latter overrides ``lab`` with it);
- ``peer``: the test-side server signing with ``key``;
- ``rollout_lab(models, ...)``: a ``RolloutLab`` (server thread, simulated fleet) on the
  session's broker, closed after the test;
- ``secure_fleet``: enrolled devices and a Mosquitto on the generated TLS config;
- ``empty_store``: a migrated, empty store, once on SQLite and once on PostgreSQL;
- ``lab_db_url``: the database a ``rollout_lab`` runs on, once SQLite, once PostgreSQL;
- ``api_fleet``: a `fleetctl server` with its HTTPS API and two agents, for comparing
  fleetctl on the server's host with fleetctl through FLEET_API_URL (``harness.remote_cli``),
  one per module (its topic prefix named after it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deltafleet.server import enroll, keys
from deltafleet.server.config import ServerConfig
from deltafleet.server.store import Store, upgrade
from deltafleet.shared import SigningKey
from tests.harness.broker import has_mosquitto
from tests.harness.fleetlab import Lab
from tests.harness.modelgen import make_onnx_pair
from tests.harness.mqtt_peer import Peer
from tests.harness.need import missing
from tests.harness.remote_cli import api_fleet as start_api_fleet
from tests.harness.rollout_lab import RolloutLab
from tests.harness.tls_broker import TlsBroker


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    url = (f"sqlite:///{tmp_path}/fleet.db" if request.param == "sqlite"
           else str(request.getfixturevalue("pg_url")))
    upgrade(url)
    return Store(url)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def lab_db_url(request: pytest.FixtureRequest) -> str | None:
    """A ``rollout_lab`` database: None (the lab's own SQLite file), then PostgreSQL."""
    return None if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))


@pytest.fixture
def key(tmp_path: Path) -> tuple[SigningKey, Path]:
    """A fresh online signing key and the public key file agents are told to trust."""
    k = SigningKey.generate()
    k.save(tmp_path / "signing.key", tmp_path / "signing.pub")
    return k, tmp_path / "signing.pub"


@pytest.fixture(scope="session")
def onnx_pair(tmp_path_factory: pytest.TempPathFactory) -> Callable[[float], dict[str, Path]]:
    """``onnx_pair(size_mb)`` -> {"v1": ..., "v2": ...}: an ONNX fine-tune (the same graph,
    changed weights), generated once per session and size. Tests must not modify the files."""
    made: dict[float, dict[str, Path]] = {}

    def pair(size_mb: float) -> dict[str, Path]:
        if size_mb not in made:
            v1, v2 = make_onnx_pair(tmp_path_factory.mktemp(f"onnx-pair-{size_mb}"),
                                    size_mb=size_mb)
            made[size_mb] = {"v1": v1, "v2": v2}
        return made[size_mb]

    return pair


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    """A 1 MB ONNX v1/v2 pair of the test's own (a fine-tune: the same graph, changed weights)."""
    return make_onnx_pair(tmp_path / "models", size_mb=1.0)


@pytest.fixture
def lab(tmp_path: Path, broker) -> Iterator[Lab]:
    """Agent processes on the session's broker."""
    lab = Lab(tmp_path / "lab", mqtt_url=broker.url)
    yield lab
    lab.close()


@pytest.fixture
def fresh_lab(tmp_path: Path, fresh_broker) -> Iterator[Lab]:
    """Agent processes on a broker of the test's own (a clean retained store)."""
    lab = Lab(tmp_path / "lab", mqtt_url=fresh_broker.url)
    yield lab
    lab.close()


@pytest.fixture
def peer(broker, key) -> Iterator[Peer]:
    """The test-side server: signs manifests with ``key``, serves chunks, records events."""
    p = Peer(broker.url, key[0])
    yield p
    p.close()


@pytest.fixture
def rollout_lab(tmp_path: Path, broker) -> Iterator[Callable[..., RolloutLab]]:
    """``rollout_lab(models, *, db_url=None, start=True)``: a RolloutLab in ``tmp_path`` on the
    session's broker with ``models`` as detector versions, its server thread started unless
    ``start=False``; every lab made is closed after the test."""
    made: list[RolloutLab] = []

    def make(model_files: dict[str, Path], *, db_url: str | None = None,
             start: bool = True) -> RolloutLab:
        root = tmp_path if not made else tmp_path / f"rollout-lab-{len(made)}"
        root.mkdir(exist_ok=True)
        lab = RolloutLab(root, broker.url, model_files, db_url=db_url)
        made.append(lab)
        if start:
            lab.start_server()
        return lab

    yield make
    for lab in reversed(made):
        lab.close()


@pytest.fixture
def secure_fleet(tmp_path: Path) -> Iterator[tuple[ServerConfig, TlsBroker]]:
    """FLEET_HOME with keys, CA and two enrolled devices (dev-a, dev-b) and a revoked one
    (dev-r), and a Mosquitto running the generated config."""
    if not has_mosquitto():
        missing("the mosquitto binary")
    cfg = ServerConfig.from_env({"FLEET_HOME": str(tmp_path / "home"),
                                 "FLEET_MQTT_URL": "mqtts://127.0.0.1:8883"})
    keys.init_keys(cfg)
    for dev in ("dev-a", "dev-b", "dev-r"):
        enroll.enroll_device(cfg, dev, tmp_path / f"enroll-{dev}")
    enroll.revoke_device(cfg, "dev-r", reason="test")
    (tmp_path / "broker").mkdir()
    broker = TlsBroker(cfg, tmp_path / "broker")
    yield cfg, broker
    broker.stop()


@pytest.fixture(scope="module")
def api_fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, broker
              ) -> Iterator[dict]:
    """``harness.remote_cli.api_fleet`` for the module: tokens, detector:v1 rolled out to
    cam-1 and cam-2 through the API (``local``, ``remote``, ``same`` compare the two paths)."""
    name = request.module.__name__.rsplit(".", 1)[-1].replace("test_", "").replace("_", "-")
    with start_api_fleet(tmp_path_factory.mktemp(name), broker.url, f"{name}/v1") as fleet:
        yield fleet
