"""Hardware-aware variant selection: a pure function that says which variant a device gets,
by which figures, and why.

``select_variant(device, variants, objective, benchmarks, baselines) -> Choice``:

1. **Constraints** (every variant that fails one is out, with the first failing rule as its
   reason): a runtime for the variant's format, at least the variant's minimum runtime
   version, an ONNX opset the device's ONNX Runtime implements (``ORT_MAX_OPSET``), the
   accelerator the variant needs among the providers the device could actually open, the
   variant's memory (measured model RSS, else the static estimate) with ``MEMORY_HEADROOM``
   left over, and disk for the staged file beside the running one.
2. **Accuracy budget**: for ``latency`` and ``size``, a variant whose recorded accuracy is more
   than ``objective.accuracy_budget`` below the best fitting variant's is out.
3. **Best by objective**, by figures of ONE source for all candidates so that numbers compare:
   the device's own benchmark if it measured every candidate, else its type's baseline (the
   median over devices of the type) if that covers every candidate, else static estimates
   (file size; precision for accuracy). ``latency``: lowest p50; ``size``: smallest file;
   ``accuracy``: highest recorded accuracy. Ties: smaller file, then name.

No I/O, no clock: callers pass what the store holds. The brute-force check in
``scripts/bench/selection.py`` re-derives the same answer independently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from .errors import ObjectiveInvalid

__all__ = [
    "DEFAULT_OBJECTIVE",
    "MEMORY_HEADROOM",
    "OBJECTIVES",
    "TypePlan",
    "Choice",
    "DeviceFacts",
    "Figures",
    "Objective",
    "VariantFacts",
    "device_type_of",
    "plan_fleet",
    "select_variant",
    "variant_facts",
    "with_parent_accuracy",
    "why_not",
]

OBJECTIVES = ("latency", "size", "accuracy")
MEMORY_HEADROOM = 0.25  # a variant may use at most 75% of the memory the device has free
STATIC_MEMORY_FACTOR = 2.0  # no measurement: a model needs about twice its file in memory
STATIC_MEMORY_FLOOR_BYTES = 8 << 20
DISK_FACTOR = 1.0  # the staged file needs its size free (the running one stays until commit)
# The newest default-domain ONNX opset each ONNX Runtime minor implements (its release notes).
ORT_MAX_OPSET = {(1, 14): 18, (1, 15): 19, (1, 16): 19, (1, 17): 20, (1, 18): 21,
                 (1, 19): 21, (1, 20): 21, (1, 21): 22, (1, 22): 22, (1, 23): 23}
# Which reported runtimes load each model format (the planner's default path uses this too).
FORMAT_RUNTIMES = {
    "onnx": ("onnxruntime",),
    "tflite": ("litert", "tflite-runtime", "tensorflow"),
    "ptl": ("torch",),
}
PRECISION_RANK = {"fp32": 3, "fp16": 2, "int8": 1}  # static accuracy estimate


@lru_cache(maxsize=4096)
def _version_tuple(text: str | None) -> tuple[int, ...]:
    out = []
    for part in (text or "").split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


@lru_cache(maxsize=1024)
def ort_max_opset(version: str) -> int | None:
    """The newest ONNX opset an ONNX Runtime version implements (None: unknown, older)."""
    v = _version_tuple(version)[:2]
    if v in ORT_MAX_OPSET:
        return ORT_MAX_OPSET[v]  # type: ignore[index]
    newest = max(ORT_MAX_OPSET)
    return ORT_MAX_OPSET[newest] if v > newest else None


def device_type_of(labels: Mapping[str, Any], arch: str | None, cpu: str | None,
                   memory_bytes: int | None, accelerator: str | None) -> str:
    """A device's type, the key of the baseline library: its ``device-type`` label when it has
    one (operators name their boards), else ``arch/cpu/memory class[/accelerator]`` with the
    memory rounded to a power-of-two GiB (``x86_64/intel-core-i5/8GiB``)."""
    label = labels.get("device-type")
    if isinstance(label, str) and label.strip():
        return label.strip()[:64]
    slug = "-".join("".join(ch if ch.isalnum() else " " for ch in (cpu or "cpu").lower()).split())
    gib = (memory_bytes or 0) / (1 << 30)
    mem = "?" if not memory_bytes else (f"{max(1, 1 << round(gib).bit_length() - 1)}GiB"
                                        if gib >= 1 else f"{max(1, round(gib * 1024))}MiB")
    parts = [arch or "?", slug[:24] or "cpu", mem]
    if accelerator:
        parts.append(accelerator.lower()[:16])
    return "/".join(parts)[:64]


@dataclass(frozen=True, slots=True)
class Objective:
    kind: str = "latency"  # one of OBJECTIVES
    accuracy_budget: float | None = None  # max accuracy drop below the best fitting variant

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ObjectiveInvalid(f"unknown objective {self.kind!r}; use one of {', '.join(OBJECTIVES)}")

    @classmethod
    def parse(cls, text: str) -> Objective:
        """``--prefer KIND[@POINTS]``: ``latency@1`` is the fastest variant losing at most 1
        accuracy point against the most accurate one that fits (ObjectiveInvalid, a ValueError:
        not that form)."""
        kind, at, points = text.strip().partition("@")
        if not at:
            return cls(kind)
        try:
            budget = float(points)
        except ValueError:
            budget = -1.0
        if not 0 <= budget <= 100:  # also NaN
            raise ObjectiveInvalid(f"invalid accuracy budget {points!r} in {text!r}: give "
                                   "accuracy points from 0 to 100, e.g. latency@1")
        return cls(kind, budget / 100)

    def text(self) -> str:
        """The form ``parse`` reads back (``latency``, ``size@0.5``)."""
        if self.accuracy_budget is None:
            return self.kind
        return f"{self.kind}@{round(self.accuracy_budget * 100, 6):g}"


DEFAULT_OBJECTIVE = Objective()


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What selection needs of a device (its portrait and profile)."""

    device_id: str
    device_type: str
    runtimes: Mapping[str, str]  # name -> version
    providers: frozenset[str] = frozenset()  # usable accelerators, lower case ("cpu", "cuda")
    memory_available_bytes: int | None = None
    disk_free_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class VariantFacts:
    """What selection needs of a variant. ``option``: the caller's object (the planner's
    ``VariantOption``), handed back in the ``Choice``."""

    name: str
    sha256: str
    format: str
    precision: str
    size_bytes: int
    opset: int | None = None  # default-domain ONNX opset
    min_runtime_version: str | None = None
    accelerator: str | None = None  # a provider the variant needs ("cuda", "npu")
    accuracy: float | None = None  # recorded accuracy, 0..1
    option: Any = field(default=None, compare=False)

    @property
    def static_memory_bytes(self) -> int:
        return max(STATIC_MEMORY_FLOOR_BYTES, int(self.size_bytes * STATIC_MEMORY_FACTOR))


def variant_facts(option: Any, info: Mapping[str, Any] | None) -> VariantFacts:
    """A catalog variant (the planner's ``VariantOption`` and the ``Variant.info`` the
    catalog recorded) as selection sees it: ONNX opset from the inspection, and where the
    variant factory or the operator recorded them ``accuracy``, ``min_runtime_version`` and
    ``accelerator``."""
    info = info or {}
    opset = (info.get("opset") or {}).get("ai.onnx") if isinstance(info.get("opset"), dict) else None
    acc = info.get("accuracy")
    if acc is None and isinstance(info.get("metrics"), dict):
        acc = info["metrics"].get("accuracy")
    if acc is None:  # measured by `model optimize --eval`
        acc = _dig(info, "optimize", "accuracy", "variant")
    return VariantFacts(
        option.name, option.sha256, option.format, option.precision, option.size_bytes,
        opset=opset if isinstance(opset, int) else None,
        min_runtime_version=info.get("min_runtime_version") if isinstance(
            info.get("min_runtime_version"), str) else None,
        accelerator=info.get("accelerator") if isinstance(info.get("accelerator"), str) else None,
        accuracy=float(acc) if isinstance(acc, int | float) and not isinstance(acc, bool) else None,
        option=option)


def _dig(info: Mapping[str, Any], *keys: str) -> Any:
    value: Any = info
    for key in keys:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def with_parent_accuracy(facts: Mapping[Any, VariantFacts],
                         infos: Mapping[Any, Mapping[str, Any] | None]) -> dict[Any, VariantFacts]:
    """``facts`` where a parent variant without a recorded accuracy gets the one its child's
    ``model optimize --eval`` measured for it on the same eval set (by the parent's sha256)."""
    measured: dict[str, float] = {}
    for info in infos.values():
        parent_sha = _dig(info or {}, "optimize", "parent", "sha256")
        acc = _dig(info or {}, "optimize", "accuracy", "parent")
        if isinstance(parent_sha, str) and isinstance(acc, int | float) \
                and not isinstance(acc, bool):
            measured.setdefault(parent_sha, float(acc))
    return {k: (replace(v, accuracy=measured[v.sha256])
                if v.accuracy is None and v.sha256 in measured else v)
            for k, v in facts.items()}


@dataclass(frozen=True, slots=True)
class Figures:
    """Benchmark figures of one variant (by sha256) on one device, or a type's median."""

    p50_us: int
    p95_us: int
    load_ms: int = 0
    model_rss_bytes: int | None = None  # what loading and running the model added to RSS
    energy_uj: int | None = None  # per inference, where RAPL is readable
    devices: int = 1  # a baseline: how many devices it is the median of

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class Choice:
    variant: VariantFacts | None
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)  # the winner's, with "source"
    rejected: dict[str, str] = field(default_factory=dict)  # variant name -> why not


def _runtime_version(device: DeviceFacts, fmt: str) -> tuple[str, str] | None:
    for name in FORMAT_RUNTIMES.get(fmt, ()):
        if name in device.runtimes:
            return name, device.runtimes[name]
    return None


def _memory_need(v: VariantFacts, own: Figures | None, base: Figures | None) -> tuple[int, str]:
    for figs, source in ((own, "measured"), (base, "type baseline")):
        if figs is not None and figs.model_rss_bytes is not None:
            return figs.model_rss_bytes, source
    return v.static_memory_bytes, "estimated"


def why_not(device: DeviceFacts, v: VariantFacts, own: Figures | None = None,
            base: Figures | None = None) -> str | None:
    """The first constraint (rule 1) ``v`` fails on ``device``, None if it fits. ``own`` and
    ``base``: the device's and its type's figures of ``v``, if any (measured memory)."""
    rt = _runtime_version(device, v.format)
    if rt is None:
        return f"no {v.format} runtime"
    name, version = rt
    if v.min_runtime_version and _version_tuple(version) < _version_tuple(v.min_runtime_version):
        return f"{name} {version} < {v.min_runtime_version}"
    if v.format == "onnx" and v.opset is not None and name == "onnxruntime":
        top = ort_max_opset(version)
        if top is not None and v.opset > top:
            return f"opset {v.opset} > {top} of {name} {version}"
    if v.accelerator and v.accelerator.lower() not in device.providers:
        return f"needs {v.accelerator}"
    if device.memory_available_bytes is not None:
        need, how = _memory_need(v, own, base)
        allowed = int(device.memory_available_bytes * (1 - MEMORY_HEADROOM))
        if need > allowed:
            return f"memory: {how} {need >> 20} MiB > {allowed >> 20} MiB allowed"
    if device.disk_free_bytes is not None and v.size_bytes * DISK_FACTOR > device.disk_free_bytes:
        return f"disk: {v.size_bytes >> 20} MiB > {device.disk_free_bytes >> 20} MiB free"
    return None


def _key(objective: str, v: VariantFacts, figs: Figures | None) -> tuple:
    if objective == "latency":
        primary: float = figs.p50_us if figs is not None else v.size_bytes
    elif objective == "size":
        primary = v.size_bytes
    else:
        primary = -(v.accuracy if v.accuracy is not None else PRECISION_RANK.get(v.precision, 0))
    return (primary, v.size_bytes, v.name)


def select_variant(device: DeviceFacts, variants: Sequence[VariantFacts],
                   objective: Objective = DEFAULT_OBJECTIVE,
                   benchmarks: Mapping[str, Figures] | None = None,
                   baselines: Mapping[tuple[str, str], Figures] | None = None) -> Choice:
    """The variant for ``device`` (rules: module docstring). ``benchmarks``: the device's own
    figures by variant sha256; ``baselines``: (device type, sha256) -> the type's median."""
    own_all = benchmarks or {}
    base_all = baselines or {}
    rejected: dict[str, str] = {}
    fitting: list[tuple[VariantFacts, Figures | None, Figures | None]] = []
    for v in variants:
        own = own_all.get(v.sha256)
        base = base_all.get((device.device_type, v.sha256))
        why = why_not(device, v, own, base)
        if why is None:
            fitting.append((v, own, base))
        else:
            rejected[v.name] = why
    if not fitting:
        detail = "; ".join(f"{n}: {w}" for n, w in sorted(rejected.items())) or "no variants"
        return Choice(None, f"incompatible: {detail}", rejected=rejected)
    if objective.kind != "accuracy" and objective.accuracy_budget is not None:
        known = [v.accuracy for v, _, _ in fitting if v.accuracy is not None]
        if known:
            floor = max(known) - objective.accuracy_budget
            kept = [f for f in fitting if f[0].accuracy is None or f[0].accuracy >= floor]
            for v, _, _ in fitting:
                if not any(k[0] is v for k in kept):
                    rejected[v.name] = f"accuracy {v.accuracy:.3f} below the budget ({floor:.3f})"
            fitting = kept
    if all(own is not None for _, own, _ in fitting):
        source, pick = "device", 1
    elif all(base is not None for _, _, base in fitting):
        source, pick = "type baseline", 2
    else:
        source, pick = "static", 0
    def figs_of(f: tuple[VariantFacts, Figures | None, Figures | None]) -> Figures | None:
        return f[1] if pick == 1 else f[2] if pick == 2 else None

    scored = sorted(fitting, key=lambda f: _key(objective.kind, f[0], figs_of(f)))
    v = scored[0][0]
    figs = figs_of(scored[0])
    figures: dict[str, Any] = {"source": source, "size_bytes": v.size_bytes}
    if figs is not None:
        figures.update(figs.to_json())
    if v.accuracy is not None:
        figures["accuracy"] = v.accuracy
    reason = _reason(objective.kind, source, v, figs, len(fitting), scored)
    if rejected:
        reason += "; not " + "; ".join(f"{n} ({w})" for n, w in sorted(rejected.items())[:3])
    return Choice(v, reason, figures, rejected)


def _reason(objective: str, source: str, v: VariantFacts, figs: Figures | None, n: int,
            scored: list[tuple[VariantFacts, Figures | None, Figures | None]]) -> str:
    if n == 1:
        return f"only fitting variant ({source} figures)"
    runner = scored[1][0]
    if objective == "latency" and figs is not None:
        other = scored[1][1] if source == "device" else scored[1][2]
        theirs = f" vs {runner.name} {other.p50_us} us" if other is not None else ""
        return f"lowest p50 by {source}: {figs.p50_us} us{theirs}"
    if objective == "latency":
        return f"smallest file (static latency estimate, no measurements): {v.size_bytes} B"
    if objective == "size":
        return f"smallest file: {v.size_bytes} B vs {runner.name} {runner.size_bytes} B"
    return (f"highest accuracy {v.accuracy if v.accuracy is not None else v.precision}"
            f" vs {runner.name}")


@dataclass(frozen=True, slots=True)
class TypePlan:
    """``rollout plan``'s per-type line: the variant most devices of the type get and why."""

    device_type: str
    variant: str | None
    reason: str
    figures: dict[str, Any]
    devices: int
    incompatible: tuple[str, ...] = ()  # device ids no variant fits
    variants: dict[str, int] = field(default_factory=dict)  # every choice: how many devices


def _name(c: Choice) -> str | None:
    return c.variant.name if c.variant is not None else None


def plan_fleet(devices: Sequence[DeviceFacts], variants: Sequence[VariantFacts],
               objective: Objective = DEFAULT_OBJECTIVE,
               benchmarks: Mapping[str, Mapping[str, Figures]] | None = None,
               baselines: Mapping[tuple[str, str], Figures] | None = None,
               ) -> tuple[dict[str, Choice], list[TypePlan]]:
    """``select_variant`` for every device (``benchmarks``: device id -> its own figures),
    and per device type the most common choice. Returns (choice per device id, type plans)."""
    own = benchmarks or {}
    choices: dict[str, Choice] = {}
    by_type: dict[str, list[str]] = {}
    for d in devices:
        choices[d.device_id] = select_variant(d, variants, objective, own.get(d.device_id),
                                              baselines)
        by_type.setdefault(d.device_type, []).append(d.device_id)
    plans = []
    for t in sorted(by_type):
        ids = by_type[t]
        counts: dict[str | None, int] = {}
        for i in ids:
            name = _name(choices[i])
            counts[name] = counts.get(name, 0) + 1
        top = max(counts, key=lambda n: (counts[n], n is not None, n or ""))
        sample = next(choices[i] for i in ids if _name(choices[i]) == top)
        plans.append(TypePlan(t, top, sample.reason, sample.figures, len(ids),
                              tuple(i for i in ids if choices[i].variant is None),
                              {str(k): n for k, n in counts.items()}))
    return choices, plans
