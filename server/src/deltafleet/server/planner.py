"""Pure rollout planning: which variant a device gets, what a full install of it ships, and
whether a delta is worth sending instead.

No I/O here; the daemon and `fleetctl rollout plan` feed it rows and act on its answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deltafleet.codecs import IDENTITY

# A delta is sent only when it is at least this much smaller than the full artifact.
DELTA_MIN_SAVING = 0.10

FORMAT_RUNTIMES = {
    "onnx": ("onnxruntime",),
    "tflite": ("litert", "tflite-runtime", "tensorflow"),
}


@dataclass(frozen=True, slots=True)
class FullArtifact:
    """What a full install ships: the model file as it is (codec "identity", sha256 = the
    model's) or its compressed form (codec "zstd", its own sha256 and size)."""

    codec: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class VariantOption:
    variant_id: int
    name: str
    format: str
    precision: str
    sha256: str
    size_bytes: int  # the model file
    compressed: FullArtifact | None = None  # recorded when it is smaller than the model
    # signed into manifests: the IO contract the agent checks the loaded model against, and
    # golden inputs it warms the model up on and probes it with during the trial
    io_signature: dict[str, Any] | None = field(default=None, compare=False)
    golden: tuple[dict[str, Any], ...] = field(default=(), compare=False)

    @property
    def identity(self) -> FullArtifact:
        return FullArtifact(IDENTITY, self.sha256, self.size_bytes)

    @property
    def full(self) -> FullArtifact:
        """The full artifact: the compressed model when the catalog has one, else the model."""
        return self.compressed if self.compressed is not None else self.identity


@dataclass(frozen=True, slots=True)
class Choice:
    variant: VariantOption | None
    reason: str = ""


def supported_formats(runtimes: dict[str, str]) -> set[str]:
    return {fmt for fmt, names in FORMAT_RUNTIMES.items() if any(n in runtimes for n in names)}


def choose_variant(
    runtimes: dict[str, str], running_variant: str | None, options: list[VariantOption]
) -> Choice:
    """Prefer the variant the device already runs (deltas stay small), then "default"."""
    formats = supported_formats(runtimes)
    fitting = [o for o in options if o.format in formats]
    if not fitting:
        have = ", ".join(sorted(runtimes)) or "none"
        want = ", ".join(sorted({o.format for o in options})) or "none"
        return Choice(None, f"no variant for this device: it has runtimes [{have}], "
                            f"the version has formats [{want}]")
    for preferred in (running_variant, "default"):
        for o in fitting:
            if o.name == preferred:
                return Choice(o)
    return Choice(sorted(fitting, key=lambda o: o.name)[0])


def delta_worth_it(delta_size_bytes: int | None, full_artifact_bytes: int) -> bool:
    """True when the delta is at least DELTA_MIN_SAVING smaller than the full artifact it
    replaces: what a full install would ship (``VariantOption.full``, the compressed model
    when there is one), not the model file's own size."""
    return delta_size_bytes is not None and delta_size_bytes <= full_artifact_bytes * (
        1 - DELTA_MIN_SAVING
    )
