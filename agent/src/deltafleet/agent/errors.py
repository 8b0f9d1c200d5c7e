"""Exception root for deltafleet.agent, subclassed by whose fault it is."""

from __future__ import annotations

from deltafleet.shared import DeltafleetError


class AgentError(DeltafleetError):
    """Root of the agent's own errors."""


class ConfigError(AgentError):
    """The agent's config file or environment is invalid."""


class UpdateRejected(AgentError):
    """An update failed a check (signature, binding, hash, size); the running model is kept."""


class ArtifactRefused(UpdateRejected):
    """The artifact itself does not decode into the signed target (malformed, a lying header,
    another result): the same bytes never will, so the refusal is final for that artifact."""


class DecodeLimitHit(ArtifactRefused):
    """The artifact's decode hit the device's memory cap or time limit (a larger cap or
    limit may let it through; the same ones never will)."""


class ModelRuntimeError(AgentError):
    """A model failed to load or to run in its inference runtime."""


class SignatureRejected(UpdateRejected):
    """A manifest's signature is not made by a currently trusted key."""
