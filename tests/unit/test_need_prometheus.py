"""Under CI=true a missing Prometheus fails the test that needs it; elsewhere it skips."""

from __future__ import annotations

import pytest

from tests.harness import need


def test_a_missing_prometheus_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(need, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="prometheus and promtool"):
        need.prometheus()


def test_a_missing_prometheus_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(need, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception):
        need.prometheus()
