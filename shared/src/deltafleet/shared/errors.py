"""Exception root for deltafleet.shared, subclassed by whose fault it is."""

from __future__ import annotations


class DeltafleetError(Exception):
    """Root of every error deltafleet raises on purpose. Its message is one line for a user."""


class WireError(DeltafleetError):
    """A message on the wire is malformed: bad JSON, a missing or wrongly typed field."""


class VerificationError(DeltafleetError):
    """Something signed or hashed did not verify: never act on the data that raised it."""


class KeyFileError(DeltafleetError):
    """A key file is missing, unreadable or of the wrong kind."""
