"""The server installs and imports without the agent: deltafleet-server declares everything it
imports (the codecs it shares with devices come from ``deltafleet-shared[codecs]``).

A fresh virtualenv gets ``shared`` and ``server`` (built as wheels, not editable), and nothing
else. Needs uv (``$FLEET_UV``, ``uv`` on PATH or ``<repo>/.tools/bin/uv``) and access to the
package registry (or a warm uv cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN_DISTRIBUTIONS = ("deltafleet-agent", "onnxruntime")
FORBIDDEN_MODULES = ("deltafleet.agent",)
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


def _run(cmd: list[str], cwd: Path, timeout_s: float = 120,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout_s
    )
    if check:
        assert proc.returncode == 0, (
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def server_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only deltafleet-shared, deltafleet-server and their deps."""
    uv = _uv()
    work = tmp_path_factory.mktemp("clean-server")
    venv = work / "venv"
    # cwd outside the repo, so the workspace's pyproject.toml cannot influence uv.
    _run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], cwd=work)
    _run(
        [
            uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
            str(REPO / "shared"), str(REPO / "server"),
        ],
        cwd=work,
        timeout_s=INSTALL_TIMEOUT_S,
    )  # fmt: skip
    return venv


def _python(venv: Path, code: str, cwd: Path) -> dict:
    proc = _run([str(venv / "bin" / "python"), "-c", textwrap.dedent(code)], cwd=cwd)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_agent_distribution_is_installed(server_venv: Path, tmp_path: Path) -> None:
    result = _python(
        server_venv,
        f"""
        import importlib.metadata as md, importlib.util, json
        found = {{}}
        for name in {list(FORBIDDEN_DISTRIBUTIONS)!r}:
            try:
                found[name] = md.version(name)
            except md.PackageNotFoundError:
                pass
        print(json.dumps({{
            "found": found,
            "server_version": md.distribution("deltafleet-server").version,
            "agent_importable": importlib.util.find_spec("deltafleet.agent") is not None,
        }}))
        """,
        tmp_path,
    )
    assert result["found"] == {}
    assert result["server_version"]
    assert result["agent_importable"] is False


def test_importing_every_server_module_loads_no_agent_module(
    server_venv: Path, tmp_path: Path
) -> None:
    result = _python(
        server_venv,
        f"""
        import importlib, json, pkgutil, sys
        import deltafleet.server, deltafleet.server.planner, deltafleet.server.codecs
        errors = []
        names = []
        for info in pkgutil.walk_packages(
            deltafleet.server.__path__, "deltafleet.server.", onerror=errors.append
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
            "server_file": deltafleet.server.__file__,
        }}))
        """,
        tmp_path,
    )
    assert result["errors"] == []
    assert result["forbidden"] == []
    assert {"deltafleet.server.planner", "deltafleet.server.codecs.tensor"} <= set(result["modules"])
    # Installed as a wheel into the venv, not an editable link back into the repo.
    assert Path(result["server_file"]).resolve().is_relative_to(server_venv.resolve())


def test_the_server_round_trips_a_delta_with_the_shared_decoder(
    server_venv: Path, tmp_path: Path
) -> None:
    base, target = tmp_path / "base", tmp_path / "target"
    base.write_bytes(bytes(range(256)) * 256)
    target.write_bytes(bytes(range(256)) * 250 + b"changed" * 100)
    result = _python(
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
    proc = _run([str(server_venv / "bin" / "fleetctl"), "--help"], cwd=tmp_path)
    assert "fleetctl" in proc.stdout or "usage" in proc.stdout.lower()
