"""The agent installs and imports on a device without sqlalchemy, alembic, onnx or server code.

A fresh virtualenv gets ``shared`` and ``agent[onnxruntime]`` (built as wheels, not editable),
and nothing else. Needs uv (``$FLEET_UV``, ``uv`` on PATH or ``<repo>/.tools/bin/uv``) and
access to the package registry (or a warm uv cache).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import cleanvenv, modelgen
from tests.harness.cleanvenv import INSTALL_TIMEOUT_S, REPO

FORBIDDEN_DISTRIBUTIONS = ("sqlalchemy", "alembic", "onnx", "deltafleet-server")
FORBIDDEN_MODULES = ("sqlalchemy", "alembic", "onnx", "deltafleet.server")

pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT_S + 300)


@pytest.fixture(scope="module")
def agent_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only deltafleet-shared, deltafleet-agent[onnxruntime] and their deps."""
    return cleanvenv.build(tmp_path_factory.mktemp("clean-agent"),
                           str(REPO / "shared"), f"{REPO / 'agent'}[onnxruntime]")


def test_no_server_or_onnx_distribution_is_installed(agent_venv: Path, tmp_path: Path) -> None:
    result = {
        "found": cleanvenv.installed(agent_venv, FORBIDDEN_DISTRIBUTIONS, tmp_path),
        "agent_version": cleanvenv.installed(agent_venv, ["deltafleet-agent"], tmp_path).get(
            "deltafleet-agent"),
    }
    assert result["found"] == {}
    assert result["agent_version"]


def test_importing_every_agent_module_loads_no_server_module(
    agent_venv: Path, tmp_path: Path
) -> None:
    result = cleanvenv.import_every_module(agent_venv, "deltafleet.agent", FORBIDDEN_MODULES,
                                           tmp_path)
    assert result["errors"] == []
    assert result["forbidden"] == []
    assert "deltafleet.agent.runtime" in result["modules"]
    # Installed as a wheel into the venv, not an editable link back into the repo.
    assert Path(result["file"]).resolve().is_relative_to(agent_venv.resolve())


def test_fleet_agent_help_exits_zero(agent_venv: Path, tmp_path: Path) -> None:
    proc = cleanvenv.run([str(agent_venv / "bin" / "fleet-agent"), "--help"], cwd=tmp_path)
    assert "fleet-agent" in proc.stdout or "usage" in proc.stdout.lower()


def test_agent_runs_an_onnx_model_without_onnx_installed(agent_venv: Path, tmp_path: Path) -> None:
    model = modelgen.make_onnx_model(tmp_path / "m.onnx", size_mb=0.1)
    result = cleanvenv.python_json(
        agent_venv,
        f"""
        import json, sys
        from pathlib import Path
        from deltafleet.agent.runtime import available_runtimes, load_model, zero_feeds
        from deltafleet.agent.serving import check_outputs
        with load_model(Path({str(model)!r}), "onnx") as m:
            out = m.run(zero_feeds(m))
            check_outputs(m, out)
        print(json.dumps({{
            "runtimes": available_runtimes(),
            "shape": list(out["output"].shape),
            "onnx_loaded": "onnx" in sys.modules,
        }}))
        """,
        tmp_path,
    )
    assert "onnxruntime" in result["runtimes"]
    assert result["shape"] == [1, 10]
    assert result["onnx_loaded"] is False
