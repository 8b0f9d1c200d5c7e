"""The rollout controller, as the daemon and tests know it: ``RolloutController`` is the SQL
adapter of the pure rollout engine (``rollout.sql``); the rules are in ``rollout.engine`` and
the states and their legal moves in the tables of ``rollout.states``."""

from __future__ import annotations

from .rollout.sql import CONTROLLER, LEASE_S, Publish, RolloutController

__all__ = ["CONTROLLER", "LEASE_S", "Publish", "RolloutController"]
