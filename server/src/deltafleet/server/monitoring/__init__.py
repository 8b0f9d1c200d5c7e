"""Monitoring files shipped with the server (in the wheel): Prometheus alert rules
(``rules.yml``) and their promtool unit tests (``rules_test.yml``), Grafana dashboards
(``dashboards/*.json``, written by ``dashboards.py``) and Grafana provisioning files
(``provisioning/``). docs/observability.md says how to use them."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules.yml"
RULES_TEST = HERE / "rules_test.yml"
DASHBOARDS_DIR = HERE / "dashboards"
PROVISIONING_DIR = HERE / "provisioning"

__all__ = ["DASHBOARDS_DIR", "HERE", "PROVISIONING_DIR", "RULES", "RULES_TEST"]
