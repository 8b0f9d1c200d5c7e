"""Fault injection is configuration: ``FaultPlan`` in ``AgentConfig``, read once by load_config."""

from __future__ import annotations

import pytest

from deltafleet.agent.config import CRASH_STEPS, AgentConfig, FaultPlan, load_config
from deltafleet.agent.errors import ConfigError


def test_no_fault_is_injected_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEET_AGENT_CRASH_AT", raising=False)
    monkeypatch.delenv("FLEET_AGENT_CRASH_AFTER_CHUNKS", raising=False)
    assert AgentConfig(device_id="d").faults == FaultPlan()
    cfg = load_config(device_id="d", trusted_keys=[__file__])
    assert cfg.faults == FaultPlan("", 0)


def test_the_environment_sets_the_fault_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_AGENT_CRASH_AT", "activate")
    monkeypatch.setenv("FLEET_AGENT_CRASH_AFTER_CHUNKS", "5")
    cfg = load_config(device_id="d", trusted_keys=[__file__])
    assert cfg.faults == FaultPlan("activate", 5) and "activate" in CRASH_STEPS


def test_a_chunk_count_that_is_no_number_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_AGENT_CRASH_AFTER_CHUNKS", "many")
    with pytest.raises(ConfigError, match="CRASH_AFTER_CHUNKS"):
        load_config(device_id="d", trusted_keys=[__file__])
