"""What a test needs from the machine: a missing service skips the test, or fails the run under
``CI=true`` (CI must never go green by skipping)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

__all__ = ["CHROMIUM", "IN_CI", "chromium", "missing", "prometheus"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    """Skip the current test for want of ``what``; under ``CI=true`` fail it instead."""
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true", pytrace=False)
    pytest.skip(f"{what} not available")


CHROMIUM = Path(os.environ.get("FLEET_TEST_CHROMIUM", "/usr/bin/chromium"))


def chromium() -> str:
    """Debian's chromium for Playwright (``executable_path``); missing: skip, or fail in CI."""
    if not CHROMIUM.is_file():
        missing(f"the chromium browser ({CHROMIUM}; `make install` installs it)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("Playwright for Python (the dev dependency group)")
    return str(CHROMIUM)


def prometheus() -> tuple[str, str]:
    """The ``prometheus`` and ``promtool`` binaries (Debian's ``prometheus`` package, which
    ``make install`` installs when missing); skips, or fails under ``CI=true``, without them."""
    import shutil

    prom, tool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prom and tool):
        missing("prometheus and promtool (Debian package `prometheus`: run `make install`)")
    assert prom and tool
    return prom, tool
