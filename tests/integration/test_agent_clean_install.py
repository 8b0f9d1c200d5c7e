"""The agent installs and imports on a device without sqlalchemy, alembic, onnx or server code.

A fresh virtualenv gets ``shared`` and ``agent[onnxruntime]`` (built as wheels, not editable),
and nothing else. Needs uv (``$FLEET_UV``, ``uv`` on PATH or ``<repo>/.tools/bin/uv``) and
access to the package registry (or a warm uv cache).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.harness import modelgen

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN_DISTRIBUTIONS = ("sqlalchemy", "alembic", "onnx", "deltafleet-server")
FORBIDDEN_MODULES = ("sqlalchemy", "alembic", "onnx", "deltafleet.server")
INSTALL_TIMEOUT_S = 900

pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT_S + 300)


def _uv() -> str:
    candidates = [os.environ.get("FLEET_UV"), shutil.which("uv"), str(REPO / ".tools/bin/uv")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("uv not found: set FLEET_UV, put uv on PATH or run `make install`", pytrace=False)


def _clean_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    }
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(cmd: list[str], cwd: Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout_s
    )
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
        f"\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def agent_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only deltafleet-shared, deltafleet-agent[onnxruntime] and their deps."""
    uv = _uv()
    work = tmp_path_factory.mktemp("clean-agent")
    venv = work / "venv"
    # cwd outside the repo, so the workspace's pyproject.toml cannot influence uv.
    _run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], cwd=work)
    python = venv / "bin" / "python"
    _run(
        [
            uv, "pip", "install", "--quiet", "--python", str(python),
            str(REPO / "shared"), f"{REPO / 'agent'}[onnxruntime]",
        ],
        cwd=work,
        timeout_s=INSTALL_TIMEOUT_S,
    )  # fmt: skip
    return venv


def _python(venv: Path, code: str, cwd: Path) -> dict:
    proc = _run([str(venv / "bin" / "python"), "-c", textwrap.dedent(code)], cwd=cwd)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_server_or_onnx_distribution_is_installed(agent_venv: Path, tmp_path: Path) -> None:
    result = _python(
        agent_venv,
        f"""
        import importlib.metadata as md, json
        found = {{}}
        for name in {list(FORBIDDEN_DISTRIBUTIONS)!r}:
            try:
                found[name] = md.version(name)
            except md.PackageNotFoundError:
                pass
        agent = md.distribution("deltafleet-agent")
        print(json.dumps({{"found": found, "agent_version": agent.version}}))
        """,
        tmp_path,
    )
    assert result["found"] == {}
    assert result["agent_version"]


def test_importing_every_agent_module_loads_no_server_module(
    agent_venv: Path, tmp_path: Path
) -> None:
    result = _python(
        agent_venv,
        f"""
        import importlib, json, pkgutil, sys
        import deltafleet.agent
        errors = []
        names = []
        for info in pkgutil.walk_packages(
            deltafleet.agent.__path__, "deltafleet.agent.", onerror=errors.append
        ):
            names.append(info.name)
            try:
                importlib.import_module(info.name)
            except Exception as e:
                errors.append(f"{{info.name}}: {{type(e).__name__}}: {{e}}")
        forbidden = sorted(
            m for m in sys.modules
            if any(m == f or m.startswith(f + ".") for f in {list(FORBIDDEN_MODULES)!r})
        )
        print(json.dumps({{
            "modules": names,
            "errors": [str(e) for e in errors],
            "forbidden": forbidden,
            "agent_file": deltafleet.agent.__file__,
        }}))
        """,
        tmp_path,
    )
    assert result["errors"] == []
    assert result["forbidden"] == []
    assert "deltafleet.agent.runtime" in result["modules"]
    # Installed as a wheel into the venv, not an editable link back into the repo.
    assert Path(result["agent_file"]).resolve().is_relative_to(agent_venv.resolve())


def test_fleet_agent_help_exits_zero(agent_venv: Path, tmp_path: Path) -> None:
    proc = _run([str(agent_venv / "bin" / "fleet-agent"), "--help"], cwd=tmp_path)
    assert "fleet-agent" in proc.stdout or "usage" in proc.stdout.lower()


def test_agent_runs_an_onnx_model_without_onnx_installed(agent_venv: Path, tmp_path: Path) -> None:
    model = modelgen.make_onnx_model(tmp_path / "m.onnx", size_mb=0.1)
    result = _python(
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
