"""Exception root for deltafleet.server, subclassed by whose fault it is."""

from __future__ import annotations

from deltafleet.shared import DeltafleetError


class ServerError(DeltafleetError):
    """Root of the server's own errors."""


class StoreError(ServerError):
    """The database could not be reached or refused a statement (not the operator's input)."""


class UsageError(ServerError):
    """The operator asked for something invalid: fix the input and retry (exit code 2)."""


class NotFoundError(UsageError):
    """A named device, group, model, version or rollout does not exist."""


class ConflictError(UsageError):
    """The thing already exists (duplicate model version, group name, ...)."""


class CatalogError(UsageError):
    """A file is not a valid ONNX or TFLite model."""


class BlobCorrupt(ServerError):
    """A blob in the server's store does not hash to its name (or is gone): never shipped."""


class BlobMismatch(ServerError, ValueError):
    """A file offered for a blob does not hash to the blob's name; nothing was written."""


class BlobNameInvalid(ServerError, ValueError):
    """A blob was named by something that is not a sha256 (never a path into the store)."""


class ObjectiveInvalid(UsageError, ValueError):
    """A ``--prefer`` objective is not one of ``selection.OBJECTIVES`` or has a bad accuracy
    budget. Also a ``ValueError``, which the ``--prefer`` parsers reword."""


class EncodeFailed(ServerError, ValueError):
    """An encoder cannot build a delta of this pair (not models it reads, zstd refused or ran
    out of memory): the build skips that codec. Also a ``ValueError``, as before."""
