"""The shipped monitoring files: the alert rules pass `promtool check rules` and their unit
tests (`promtool test rules`), and the committed dashboards are exactly what the code makes,
each with a Prometheus datasource variable that every panel uses."""

from __future__ import annotations

import shutil
from pathlib import Path

from deltafleet.server.monitoring import DASHBOARDS_DIR, RULES, RULES_TEST, dashboards
from tests.harness import need
from tests.harness.prometheus import promtool


def test_promtool_check_rules_passes():
    _, tool = need.prometheus()
    res = promtool(tool, "check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 7 rules found" in res.stdout


def test_every_alert_has_a_promtool_unit_test_and_they_pass(tmp_path: Path):
    _, tool = need.prometheus()
    import re

    alerts = set(re.findall(r"- alert: (\w+)", RULES.read_text()))
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    assert alerts == tested
    for f in (RULES, RULES_TEST):  # promtool resolves rule_files next to the test file
        shutil.copy(f, tmp_path / f.name)
    res = promtool(tool, "test", "rules", str(tmp_path / RULES_TEST.name))
    assert res.returncode == 0, res.stdout + res.stderr


def test_committed_dashboards_equal_the_generated_ones():
    assert dashboards.main(["--check", str(DASHBOARDS_DIR)]) == 0


def test_every_panel_uses_the_datasource_variable():
    for name, board in dashboards.build().items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", name
        assert variables["datasource"]["query"] == "prometheus"
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == "${datasource}", (name, panel["title"])
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
