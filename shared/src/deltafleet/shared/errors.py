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


class StagedMismatch(VerificationError):
    """A staged file is not what its writer promised (``what``: "size" or "sha256"); it was
    not put in place."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(f"staged file {message}")
        self.what = what


def one_line(value: BaseException | str, *, limit: int | None = 300) -> str:
    """An error (or any text) as one line for a user: whitespace collapsed, the exception's
    type name when it has no message, cut to ``limit`` characters with "..."."""
    text = " ".join(str(value).split())
    if not text and isinstance(value, BaseException):
        text = type(value).__name__
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
