"""Exception root for deltafleet.agent, subclassed by whose fault it is."""

from __future__ import annotations

import errno

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


class GoldenInputInvalid(AgentError, ValueError):
    """A golden input sample (of a manifest or a bench request) does not decode into feeds.
    Also a ``ValueError``, which ``swap.golden_of`` wraps into ``UpdateRejected``."""


class JournalError(AgentError):
    """The update journal was asked for a step its record does not allow: the executor and
    the journal on disk disagree about where an update stands."""


class JournalRecordMissing(JournalError, KeyError):
    """No journal record for the model (also a ``KeyError``, as before)."""


class IllegalJournalStep(JournalError, ValueError):
    """The step does not follow the recorded one (``machine.JOURNAL_NEXT``; also a ``ValueError``)."""


class SignatureRejected(UpdateRejected):
    """A manifest's signature is not made by a currently trusted key."""


class NoSpace(UpdateRejected):
    """The state directory's filesystem cannot hold what an update needs (refused before a
    download, or ENOSPC/EDQUOT during one). Transient: the running model is kept and the
    update is retried when space is back (it is never recorded as a failed manifest)."""


NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", 122)})


def is_no_space(e: BaseException) -> bool:
    """True for a full filesystem or an exhausted quota (ENOSPC, EDQUOT)."""
    return isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS
