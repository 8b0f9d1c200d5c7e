"""The blob store as ``fleetctl model add`` sees it: its writes shown as progress steps."""

from __future__ import annotations

from pathlib import Path

from ..store.blobs import BlobStore
from ._common import fmt_bytes
from .progress import CountingReader, Steps


class ReportingBlobs(BlobStore):
    """The blob store as ``model add`` sees it, its writes shown as steps of ``steps``.

    ``catalog.add_model_version`` inspects (and hashes) the file, stores it, then builds and
    stores its compressed form; the steps follow from its calls here: the first ``put_file``
    ends "inspecting" and is "storing" (with a byte count), the time after it is
    "compressing", a second ``put_file`` stores the compressed form.
    """

    def __init__(self, blobs: BlobStore, steps: Steps) -> None:
        super().__init__(blobs.root)
        self.steps = steps
        self.puts = 0

    def put_file(self, src: Path) -> tuple[str, int]:
        size = Path(src).stat().st_size
        first, self.puts = self.puts == 0, self.puts + 1
        if first:
            self.steps.done(f"inspected and hashed {fmt_bytes(size)}")
        else:
            self.steps.done(f"compressed to {fmt_bytes(size)}")
        self.steps.start("storing" if first else "storing the compressed form", size)
        with open(src, "rb") as f:
            sha, n = self._put_stream(CountingReader(f, self.steps.advance))  # type: ignore[arg-type]
        self.steps.done(f"stored {fmt_bytes(n)}")
        if first:
            self.steps.start("compressing", size)
        return sha, n
