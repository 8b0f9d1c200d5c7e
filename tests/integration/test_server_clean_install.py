"""The server installs and imports without the agent: deltafleet-server declares everything it
imports (the codecs it shares with devices come from ``deltafleet-shared[codecs]``).

A fresh virtualenv gets ``shared`` and ``server`` (built as wheels, not editable), and nothing
else. Needs uv (``$FLEET_UV``, ``uv`` on PATH or ``<repo>/.tools/bin/uv``) and access to the
package registry (or a warm uv cache).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.harness import cleanvenv
from tests.harness.cleanvenv import INSTALL_TIMEOUT_S, REPO

FORBIDDEN_DISTRIBUTIONS = ("deltafleet-agent", "onnxruntime")
FORBIDDEN_MODULES = ("deltafleet.agent",)

pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT_S + 300)


@pytest.fixture(scope="module")
def server_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only deltafleet-shared, deltafleet-server and their deps."""
    return cleanvenv.build(tmp_path_factory.mktemp("clean-server"),
                           str(REPO / "shared"), str(REPO / "server"))


def test_no_agent_distribution_is_installed(server_venv: Path, tmp_path: Path) -> None:
    result = {
        "found": cleanvenv.installed(server_venv, FORBIDDEN_DISTRIBUTIONS, tmp_path),
        "server_version": cleanvenv.installed(server_venv, ["deltafleet-server"], tmp_path).get(
            "deltafleet-server"),
        "agent_importable": cleanvenv.python_json(
            server_venv, "import importlib.util, json; "
            "print(json.dumps(importlib.util.find_spec('deltafleet.agent') is not None))",
            tmp_path),
    }
    assert result["found"] == {}
    assert result["server_version"]
    assert result["agent_importable"] is False


def test_importing_every_server_module_loads_no_agent_module(
    server_venv: Path, tmp_path: Path
) -> None:
    result = cleanvenv.import_every_module(
        server_venv, "deltafleet.server", FORBIDDEN_MODULES, tmp_path,
        first=("deltafleet.server", "deltafleet.server.planner", "deltafleet.server.codecs"))
    assert result["errors"] == []
    assert result["forbidden"] == []
    assert {"deltafleet.server.planner", "deltafleet.server.codecs.tensor"} <= set(result["modules"])
    # Installed as a wheel into the venv, not an editable link back into the repo.
    assert Path(result["file"]).resolve().is_relative_to(server_venv.resolve())


def test_the_server_round_trips_a_delta_with_the_shared_decoder(
    server_venv: Path, tmp_path: Path
) -> None:
    base, target = tmp_path / "base", tmp_path / "target"
    base.write_bytes(bytes(range(256)) * 256)
    target.write_bytes(bytes(range(256)) * 250 + b"changed" * 100)
    result = cleanvenv.python_json(
        server_venv,
        f"""
        import json
        from pathlib import Path
        from deltafleet.codecs import decode_sha256
        from deltafleet.server.codecs import Bsdiff4Encoder
        out = Path({str(tmp_path / "delta")!r})
        Bsdiff4Encoder().encode(Path({str(base)!r}), Path({str(target)!r}), out)
        sha, size = decode_sha256("bsdiff4", out, Path({str(base)!r}))
        print(json.dumps({{"sha": sha, "size": size}}))
        """,
        tmp_path,
    )
    assert result == {"sha": hashlib.sha256(target.read_bytes()).hexdigest(),
                      "size": target.stat().st_size}


def test_fleetctl_help_exits_zero(server_venv: Path, tmp_path: Path) -> None:
    proc = cleanvenv.run([str(server_venv / "bin" / "fleetctl"), "--help"], cwd=tmp_path)
    assert "fleetctl" in proc.stdout or "usage" in proc.stdout.lower()
