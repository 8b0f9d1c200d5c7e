"""A fresh virtualenv holding only the workspace distributions a test names, built as wheels.

``build`` makes the venv with uv from outside the repository (so the workspace's
``pyproject.toml`` cannot influence uv) and installs the given requirements into it, nothing
else. Every command runs without ``VIRTUAL_ENV``, ``PYTHONPATH``, ``PYTHONHOME`` or the user
site, and must exit 0. Needs uv (``$FLEET_UV``, ``uv`` on PATH or ``<repo>/.tools/bin/uv``) and
access to the package registry (or a warm uv cache).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

__all__ = ["INSTALL_TIMEOUT_S", "REPO", "build", "import_every_module", "installed", "python_json",
           "run"]

REPO = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT_S = 900


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


def run(cmd: list[str], cwd: Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """``cmd`` in the clean environment; fails the test unless it exits 0."""
    proc = subprocess.run(
        cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout_s
    )
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
        f"\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc


def build(work: Path, *requirements: str) -> Path:
    """A venv at ``work/venv`` with ``requirements`` (paths or ``path[extra]``) and their deps."""
    uv = _uv()
    venv = work / "venv"
    run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], cwd=work)
    run([uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), *requirements],
        cwd=work, timeout_s=INSTALL_TIMEOUT_S)
    return venv


def python_json(venv: Path, code: str, cwd: Path) -> Any:
    """Run ``code`` (dedented) with the venv's python; the JSON of its last line of output."""
    proc = run([str(venv / "bin" / "python"), "-c", textwrap.dedent(code)], cwd=cwd)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def installed(venv: Path, names: Iterable[str], cwd: Path) -> dict[str, str]:
    """The version of each distribution of ``names`` installed in the venv; absent ones left out."""
    return python_json(
        venv,
        f"""
        import importlib.metadata as md, json
        found = {{}}
        for name in {list(names)!r}:
            try:
                found[name] = md.version(name)
            except md.PackageNotFoundError:
                pass
        print(json.dumps(found))
        """,
        cwd,
    )


def import_every_module(venv: Path, package: str, forbidden: Iterable[str], cwd: Path, *,
                        first: Iterable[str] = ()) -> dict:
    """Import the modules ``first``, then every module of ``package`` in the venv: the module
    names (``modules``), import failures (``errors``), the modules of ``forbidden`` packages then
    loaded (``forbidden``) and where ``package`` was imported from (``file``)."""
    return python_json(
        venv,
        f"""
        import importlib, json, pkgutil, sys
        for name in {list(first)!r}:
            importlib.import_module(name)
        package = importlib.import_module({package!r})
        errors = []
        names = []
        for info in pkgutil.walk_packages(package.__path__, {package + "."!r},
                                          onerror=errors.append):
            names.append(info.name)
            try:
                importlib.import_module(info.name)
            except Exception as e:
                errors.append(f"{{info.name}}: {{type(e).__name__}}: {{e}}")
        forbidden = sorted(
            m for m in sys.modules
            if any(m == f or m.startswith(f + ".") for f in {list(forbidden)!r})
        )
        print(json.dumps({{
            "modules": names,
            "errors": [str(e) for e in errors],
            "forbidden": forbidden,
            "file": package.__file__,
        }}))
        """,
        cwd,
    )
