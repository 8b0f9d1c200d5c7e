"""Pure rollout planning: which variant a device gets, what a full install of it ships, and
whether a delta is worth sending instead.

``plan_target`` is the one decision tree for a device: dispatch (``rollout.engine``) acts on
it and ``fleetctl rollout plan`` prints it, so the plan is what dispatch does. Its ``reason``
explains the delta-or-full choice with the figures (``delta 120.0 KiB from v1 (6% of full,
1.9 MiB compressed)``, ``delta 1.7 MiB is 92% of full (1.9 MiB compressed): not worth it, full
sent``, ``no delta from v1 (...): full sent (1.9 MiB compressed)``; "full" is what a full
install ships, see ``full_artifact``); dispatch records it per device and ``fleetctl rollout
status`` shows it.
``full_artifact`` is the one rule for what a full install ships. No I/O here: callers pass
what the store holds (``blob_problem``: None when a blob is intact, else what is wrong with it).

A rollout may pin a variant (``--variant``): ``choose_variant`` then gives that variant to
every device that can load it and says why to the ones that cannot.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from deltafleet.codecs import IDENTITY

from .phrases import size_text
from .selection import FORMAT_RUNTIMES

# A delta is sent only when it is at least this much smaller than the full artifact.
DELTA_MIN_SAVING = 0.10



@dataclass(frozen=True, slots=True)
class FullArtifact:
    """What a full install ships: the model file as it is (codec "identity", sha256 = the
    model's) or its compressed form (codec "zstd", its own sha256 and size)."""

    codec: str
    sha256: str
    size_bytes: int


BlobProblem = Callable[[str], str | None]


def all_intact(sha256: str) -> str | None:
    """A ``BlobProblem`` for callers that do not look at the store."""
    return None


def full_artifact(model_sha256: str, model_size_bytes: int,
                  compressed: FullArtifact | None = None, *,
                  blob_problem: BlobProblem = all_intact) -> FullArtifact:
    """What a full install ships: the compressed form when there is one, it is smaller than
    the model file and its blob is intact; else the model file as it is (variants registered
    before full models shipped compressed, models compression does not shrink, a compressed
    blob gone bad)."""
    if (compressed is not None and compressed.size_bytes < model_size_bytes
            and blob_problem(compressed.sha256) is None):
        return compressed
    return FullArtifact(IDENTITY, model_sha256, model_size_bytes)


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
        """The model file as it is."""
        return full_artifact(self.sha256, self.size_bytes)

    @property
    def full(self) -> FullArtifact:
        """The full artifact as the catalog has it (``full_artifact``, all blobs present)."""
        return full_artifact(self.sha256, self.size_bytes, self.compressed)


@dataclass(frozen=True, slots=True)
class Choice:
    variant: VariantOption | None
    reason: str = ""


def supported_formats(runtimes: dict[str, str]) -> set[str]:
    return {fmt for fmt, names in FORMAT_RUNTIMES.items() if any(n in runtimes for n in names)}


def choose_variant(
    runtimes: dict[str, str], running_variant: str | None, options: list[VariantOption],
    pinned: str | None = None,
) -> Choice:
    """The pinned variant when there is one (None when the device cannot load it, with
    why); else prefer the variant the device already runs (deltas stay small), then
    "default"."""
    formats = supported_formats(runtimes)
    have = ", ".join(sorted(runtimes)) or "none"
    if pinned is not None:
        named = [o for o in options if o.name == pinned]
        if not named:
            names = ", ".join(sorted(o.name for o in options)) or "none"
            return Choice(None, f"the version has no variant {pinned!r} (it has: {names})")
        (o,) = named[:1]
        if o.format not in formats:
            return Choice(None, f"cannot load pinned variant {pinned} ({o.format}): it has "
                                f"runtimes [{have}]")
        return Choice(o)
    fitting = [o for o in options if o.format in formats]
    if not fitting:
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


def share_text(part: int, whole: int) -> str:
    """``part`` as a whole percentage of ``whole`` (at least 1% when not zero)."""
    if whole <= 0:
        return "?%"
    pct = 100 * part / whole
    return f"{max(1, round(pct)) if part else 0}%"


def hold_reason(sha256: str, problem: str) -> str:
    """What a target waiting on a bad blob of the store says (``fleetctl rollout status``)."""
    word = "missing" if problem == "missing" else "corrupt"
    return f"held: server blob {sha256[:12]} {word} (store)"


@dataclass(frozen=True, slots=True)
class RunningModel:
    """What a device reports it runs of the model."""

    sha256: str
    variant: str | None = None
    version: str | None = None


@dataclass(frozen=True, slots=True)
class DeltaOption:
    """The smallest stored delta for a (base, target) pair."""

    codec: str
    sha256: str  # the delta artifact's
    size_bytes: int


class PlanKind(StrEnum):
    SKIP = "skip"  # no variant the device can load
    NONE = "none"  # it already runs the target
    FULL = "full"
    DELTA = "delta"
    BUILD = "delta?"  # the delta is to be built first; the target waits for it
    HOLD = "held"  # what it would ship is not intact in the server's store; the target waits


@dataclass(frozen=True, slots=True)
class TargetPlan:
    """What one device gets. ``bytes``: the artifact's size (for BUILD, the full artifact's:
    an upper bound). ``base_sha256``: the delta's base (DELTA) or the base to build from
    (BUILD). ``warning``: worth a log line (a compressed blob gone bad)."""

    kind: PlanKind
    reason: str = ""
    variant: VariantOption | None = None
    codec: str | None = None
    artifact_sha256: str | None = None
    bytes: int = 0
    base_sha256: str | None = None
    build_delta: bool = False
    warning: str = ""

    @property
    def sends(self) -> bool:
        return self.kind in (PlanKind.FULL, PlanKind.DELTA)


@dataclass(frozen=True, slots=True)
class Selecting:
    """Hardware-aware selection for one device (``selection.select_variant``): its facts, the
    variants' facts by variant id, the objective and the figures the store holds."""

    device: Any  # selection.DeviceFacts
    facts: Mapping[int, Any]  # variant_id -> selection.VariantFacts
    objective: Any  # selection.Objective
    benchmarks: Mapping[str, Any] | None = None  # sha256 -> Figures (the device's own)
    baselines: Mapping[tuple[str, str], Any] | None = None  # (type, sha256) -> Figures
    chosen: Any = None  # a selection.Choice already made for these inputs (a fleet-wide plan)


def select_choice(selecting: Selecting, options: list[VariantOption]) -> Choice:
    """The planner's ``Choice`` from ``selection.select_variant`` (its reason kept)."""
    from .selection import select_variant  # noqa: PLC0415

    picked = selecting.chosen
    if picked is None:
        facts = [selecting.facts[o.variant_id] for o in options
                 if o.variant_id in selecting.facts]
        picked = select_variant(selecting.device, facts, selecting.objective,
                                selecting.benchmarks, selecting.baselines)
    return Choice(None if picked.variant is None else picked.variant.option, picked.reason)


def plan_target(
    runtimes: Mapping[str, str],
    running: RunningModel | None,
    options: list[VariantOption] | tuple[VariantOption, ...],
    *,
    deltas: Mapping[tuple[str, str], DeltaOption],
    failed_deltas: Mapping[tuple[str, str], str],
    blob_problem: BlobProblem = all_intact,
    pinned: str | None = None,
    selecting: Selecting | None = None,
) -> TargetPlan:
    """The plan for one device: choose the variant, then already runs it / delta / build the
    delta first / full install / wait for the store. A delta needs its base intact in the
    store, a target file to build from, and must be worth it against what a full install
    ships (``full_artifact``, which falls back to the model file when the compressed blob is
    bad), and stays within a variant lineage: a device running variant A that gets variant B
    (the version has no A, or B is pinned) gets B in full. A pair whose build failed gets the
    full artifact. ``pinned``: the rollout's ``--variant``, which wins over everything. With
    ``selecting`` (and no pin) the variant is chosen by ``selection.select_variant``
    (constraints, objective, figures) instead of by format. The reason says why delta or full,
    with the sizes."""
    choice = (select_choice(selecting, list(options)) if selecting is not None and pinned is None
              else choose_variant(dict(runtimes), running.variant if running else None,
                                  list(options), pinned))
    v = choice.variant
    if v is None:
        return TargetPlan(PlanKind.SKIP, choice.reason)
    if running is not None and running.sha256 == v.sha256:
        return TargetPlan(PlanKind.NONE, "device already runs the target", v)
    full = full_artifact(v.sha256, v.size_bytes, v.compressed, blob_problem=blob_problem)
    warning = ""
    if v.compressed is not None and full.codec == IDENTITY:
        warning = (f"compressed form {v.compressed.sha256[:12]} of {v.sha256[:12]} is missing "
                   "or corrupt in the blob store; shipping the model as it is")

    def plan(kind: PlanKind, reason: str, codec: str, sha: str, size: int,
             base: str | None = None) -> TargetPlan:
        problem = blob_problem(sha)
        if problem is not None:
            return TargetPlan(PlanKind.HOLD, hold_reason(sha, problem), v, codec, sha, size,
                              base, warning=warning)
        return TargetPlan(kind, reason, v, codec, sha, size, base, warning=warning)

    def full_plan(reason: str) -> TargetPlan:
        return plan(PlanKind.FULL, reason, full.codec, full.sha256, full.size_bytes)

    # what a full install ships (the compressed model, usually: not the model file's size)
    full_size = size_text(full.size_bytes) + (" compressed" if full.codec != IDENTITY else "")
    if running is None:
        return full_plan(f"no version of the model on the device: full sent ({full_size})")
    if running.variant is not None and running.variant != v.name:
        # deltas stay within a variant lineage (v1-int8 -> v2-int8), never across variants
        return full_plan(f"runs variant {running.variant}, gets {v.name}: no delta across "
                         f"variants, full sent ({full_size})")
    base = running.sha256
    base_name = running.version or base[:12]

    def no_delta(why: str) -> TargetPlan:
        return full_plan(f"no delta from {base_name} ({why}): full sent ({full_size})")

    if blob_problem(base) is not None:
        return no_delta("base not in the server's store")
    delta = deltas.get((base, v.sha256))
    if delta is None:
        failed = failed_deltas.get((base, v.sha256))
        if failed is not None:
            return no_delta(failed)
        if blob_problem(v.sha256) is not None:
            return no_delta("the target's model file is not intact in the server's store")
        return TargetPlan(PlanKind.BUILD, f"delta from {base_name} not built yet (the server "
                          f"builds it; full, {full_size}, shown as the upper bound)", v, None,
                          None, full.size_bytes, base, build_delta=True, warning=warning)
    share = share_text(delta.size_bytes, full.size_bytes)
    if not delta_worth_it(delta.size_bytes, full.size_bytes):
        return full_plan(f"delta {size_text(delta.size_bytes)} is {share} of full ({full_size}): "
                         "not worth it, full sent")
    if blob_problem(delta.sha256) is not None:
        return no_delta(f"the delta {delta.sha256[:12]} is not intact in the server's store")
    return plan(PlanKind.DELTA, f"delta {size_text(delta.size_bytes)} from {base_name} "
                f"({share} of full, {full_size})", delta.codec, delta.sha256, delta.size_bytes,
                base)
