"""Errors of ``fleetctl model optimize`` that are not the operator's input (exit 1)."""

from __future__ import annotations

from ..errors import ServerError


class OptimizeError(ServerError):
    """A tool failed or is missing (the ``[optimize]`` extra), or a runtime refused a model."""


class AccuracyRefused(OptimizeError):
    """A variant loses more accuracy than its budget: nothing was registered."""
