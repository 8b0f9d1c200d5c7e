"""The model contract server and agent agree on: health policy, IO signature, golden inputs,
event states. Pure and numpy-free; the numpy conversions are adapters on each side (server
``catalog``: encode; agent ``serving``: decode).

Every type is a frozen, slotted dataclass whose ``to_wire()`` gives exactly the dict that
travels inside a manifest today, so canonical JSON (and with it every signature) is unchanged,
and whose ``from_wire()`` checks every field and raises :class:`WireError` on anything else.

Rules the types hold:

- ``HealthPolicy``: four integers, ``min_requests`` at least 1, all but ``p95_slack_us``
  non-negative (``--p95-slack-ms`` takes a negative slack, and the device honours it).
  ``from_wire`` is the strict parser the server reads stored policies with (unknown keys, wrong
  types, floats, NaN and the negatives above are refused; a key left out takes the class
  default). ``from_manifest`` is the device's lenient reading of a manifest's map (kept as it
  always was: unknown keys ignored, out-of-range values clamped), because a device must not
  refuse a manifest a newer server added a key to.
- ``IoSignature``: what a manifest signs about a model's inputs and outputs. Dimensions are
  non-negative ints or None (dynamic); a named dimension (``"N"``) only exists in catalog
  specs and becomes None in :meth:`TensorSpec.signed`. Extra keys are ignored by ``from_wire``
  (the agent verifies signatures over the raw bytes, never over a re-encoding).
- ``GoldenInput``: one sample, a tensor per model input: ``{input: {dtype, shape, b64}}``;
  ``b64`` is standard base64 (with padding) of the C-order bytes, and its length must match
  ``shape`` times the dtype's item size.
- ``EventState``: the device's report states, see the table on the enum.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .errors import WireError

__all__ = [
    "ROLLOUT_HEALTH",
    "SIGNABLE_DTYPES",
    "EventState",
    "GoldenInput",
    "GoldenTensor",
    "HealthPolicy",
    "IoSignature",
    "TensorSpec",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """The bar a new version must clear during its trial on a device.

    ``max_error_rate_ppm``: errors per million requests allowed. ``max_p95_ratio_pct``: the new
    version's latency at most this % of the previous one's on the same inputs (0 = latency not
    judged). ``min_requests``: fewest samples to judge on (the agent tops up with probes).
    ``p95_slack_us``: a latency rise smaller than this never counts.
    ``min_agreement_ppm``: the agreement gate: the share (parts per million) of sampled live
    requests and golden inputs on which the new version's answer agrees with the previous
    one's (top-1 for classifiers, relative deviation otherwise); 0 = not judged. Left out of
    the wire form when 0, so manifests without a gate read as they always did.

    The class defaults are the one set of defaults: what a device applies to a key its
    manifest leaves out (``AgentConfig.trial_*`` take them). They are the device's historical
    values, latency off and 20 requests, because a device rolls back only on a bar someone
    stated: the server states a full policy in every manifest (``RolloutPolicy.health``, which
    is :data:`ROLLOUT_HEALTH` unless the operator says otherwise), so these defaults are reached
    only by manifests without one (old servers, test peers). Taking the rollout's bar here
    instead would start judging latency on those manifests; taking these for rollouts would stop
    judging it on every rollout. Neither is a redesign's call, so both stay as they behave today.
    """

    max_error_rate_ppm: int = 10_000
    max_p95_ratio_pct: int = 0
    min_requests: int = 20
    p95_slack_us: int = 1_000
    min_agreement_ppm: int = 0

    @property
    def judges_latency(self) -> bool:
        return self.max_p95_ratio_pct > 0

    @property
    def judges_agreement(self) -> bool:
        return self.min_agreement_ppm > 0

    def to_wire(self) -> dict[str, int]:
        d = {"max_error_rate_ppm": self.max_error_rate_ppm,
             "max_p95_ratio_pct": self.max_p95_ratio_pct,
             "min_requests": self.min_requests, "p95_slack_us": self.p95_slack_us}
        if self.min_agreement_ppm:
            d["min_agreement_ppm"] = self.min_agreement_ppm
        return d

    @classmethod
    def from_wire(cls, d: Any) -> HealthPolicy:
        if not isinstance(d, Mapping):
            raise WireError("health_policy must be an object")
        unknown = sorted(str(k) for k in d if k not in _HEALTH_KEYS)
        if unknown:
            raise WireError(f"health_policy has unknown keys {unknown}")
        for key, value in d.items():
            if not _is_int(value):
                raise WireError(f"health_policy.{key} must be an integer")
            if value < 0 and key != "p95_slack_us":
                raise WireError(f"health_policy.{key} is negative")
        if d.get("min_requests", 1) < 1:
            raise WireError("health_policy.min_requests must be at least 1")
        if d.get("min_agreement_ppm", 0) > 1_000_000:
            raise WireError("health_policy.min_agreement_ppm is above 1000000")
        return cls(**d)

    @classmethod
    def from_manifest(cls, policy: Mapping[str, Any] | HealthPolicy,
                      defaults: HealthPolicy | None = None) -> HealthPolicy:
        """The device's reading of a manifest's ``health_policy``: a key left out takes
        ``defaults`` (else the class defaults), unknown keys are ignored, a negative latency
        ratio means off and ``min_requests`` is at least 1."""
        if isinstance(policy, HealthPolicy):
            return policy
        d = defaults or cls()
        return cls(
            max_error_rate_ppm=int(policy.get("max_error_rate_ppm", d.max_error_rate_ppm)),
            max_p95_ratio_pct=max(0, int(policy.get("max_p95_ratio_pct", d.max_p95_ratio_pct))),
            min_requests=max(1, int(policy.get("min_requests", d.min_requests))),
            p95_slack_us=int(policy.get("p95_slack_us", d.p95_slack_us)),
            min_agreement_ppm=min(1_000_000, max(0, int(policy.get("min_agreement_ppm",
                                                                   d.min_agreement_ppm)))),
        )


_HEALTH_KEYS = frozenset(HealthPolicy.__dataclass_fields__)

# The bar a rollout states when the operator gives none (``fleetctl rollout model``'s option
# defaults: --max-error-rate 1%, --max-p95-ratio 150%, --p95-slack-ms 1): latency judged, and
# 50 requests, the number of latency pairs a trial asks for anyway.
ROLLOUT_HEALTH = HealthPolicy(max_p95_ratio_pct=150, min_requests=50)


# dtypes server and agent name alike (numpy names); a signature with another one is not signed.
SIGNABLE_DTYPES = frozenset({
    "float16", "float32", "float64", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool",
})


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output. A dynamic dimension is None, or in catalog specs its name
    (ONNX ``dim_param``); signatures carry None only."""

    name: str
    dtype: str  # numpy dtype name where one exists ("float32"), else the format's own name
    shape: tuple[int | str | None, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def to_json(self) -> dict[str, Any]:
        return self.to_wire()

    def signed(self) -> TensorSpec:
        """This spec as a signature carries it: every dynamic or named dimension is None."""
        return TensorSpec(self.name, self.dtype,
                          tuple(d if isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                else None for d in self.shape))

    @classmethod
    def from_wire(cls, d: Any) -> TensorSpec:
        if not (isinstance(d, Mapping) and isinstance(d.get("name"), str)
                and isinstance(d.get("dtype"), str) and isinstance(d.get("shape"), list)
                and all(x is None or _is_int(x) for x in d["shape"])):
            raise WireError("a tensor spec must be {name, dtype, shape} with int or null dims")
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True, slots=True)
class IoSignature:
    """A model's inputs and outputs as a manifest signs them."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec]) -> IoSignature:
        return cls(tuple(s.signed() for s in inputs), tuple(s.signed() for s in outputs))

    @property
    def signable(self) -> bool:
        """Every dtype is one both sides name alike (else the catalog signs no signature)."""
        return all(s.dtype in SIGNABLE_DTYPES for s in (*self.inputs, *self.outputs))

    def to_wire(self) -> dict[str, Any]:
        return {"inputs": [s.to_wire() for s in self.inputs],
                "outputs": [s.to_wire() for s in self.outputs]}

    @classmethod
    def from_wire(cls, d: Any) -> IoSignature:
        if not isinstance(d, Mapping):
            raise WireError("io_signature must be an object")
        parts = []
        for part in ("inputs", "outputs"):
            specs = d.get(part)
            if not isinstance(specs, list):
                raise WireError(f"io_signature.{part} must list {{name, dtype, shape}} objects")
            try:
                parts.append(tuple(TensorSpec.from_wire(s) for s in specs))
            except WireError:
                raise WireError(
                    f"io_signature.{part} must list {{name, dtype, shape}} objects") from None
        return cls(*parts)

    def diff(self, other: IoSignature) -> list[str]:
        """Every difference from ``other``, one line each; empty when they match. Per part, a
        different set of names is one line; else one line per changed dtype and shape, in
        this signature's order."""
        out: list[str] = []
        for part in ("inputs", "outputs"):
            left = {s.name: s for s in getattr(self, part)}
            right = {s.name: s for s in getattr(other, part)}
            if set(left) != set(right):
                out.append(f"{part} {sorted(left)} != {sorted(right)}")
                continue
            for name, spec in left.items():
                theirs = right[name]
                if spec.dtype != theirs.dtype:
                    out.append(f"{part[:-1]} {name!r} dtype {spec.dtype} != {theirs.dtype}")
                if spec.shape != theirs.shape:
                    out.append(f"{part[:-1]} {name!r} shape {list(spec.shape)} != "
                               f"{list(theirs.shape)}")
        return out


# Bytes per element of the dtypes a golden tensor may have.
_ITEM_BYTES = {
    "bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "float16": 2,
    "int32": 4, "uint32": 4, "float32": 4, "int64": 8, "uint64": 8, "float64": 8,
    "complex64": 8, "complex128": 16,
}


@dataclass(frozen=True, slots=True)
class GoldenTensor:
    """One input's value in a golden sample: C-order bytes of ``shape`` elements of ``dtype``."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]
    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape),
                "b64": base64.b64encode(self.data).decode("ascii")}

    @classmethod
    def from_wire(cls, name: str, d: Any) -> GoldenTensor:
        if not (isinstance(d, Mapping) and isinstance(d.get("dtype"), str)
                and isinstance(d.get("shape"), list) and isinstance(d.get("b64"), str)):
            raise WireError(f"golden input {name!r} must be {{dtype, shape, b64}}")
        dtype, shape = d["dtype"], d["shape"]
        if dtype not in _ITEM_BYTES:
            raise WireError(f"golden input {name!r} has dtype {dtype!r} that cannot travel")
        if not all(_is_int(n) and n >= 0 for n in shape):
            raise WireError(f"golden input {name!r} shape must list non-negative integers")
        try:
            data = base64.b64decode(d["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise WireError(f"golden input {name!r} is not valid base64") from None
        want = math.prod(shape) * _ITEM_BYTES[dtype]
        if len(data) != want:
            raise WireError(f"golden input {name!r} has {len(data)} bytes, its shape {shape} of "
                            f"{dtype} needs {want}")
        return cls(name, dtype, tuple(shape), data)


@dataclass(frozen=True, slots=True)
class GoldenInput:
    """One golden sample for warm-up and trial probes: a tensor per model input."""

    tensors: tuple[GoldenTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(len(t.data) for t in self.tensors)

    def to_wire(self) -> dict[str, Any]:
        return {t.name: t.to_wire() for t in self.tensors}

    @classmethod
    def from_wire(cls, d: Any) -> GoldenInput:
        if not isinstance(d, Mapping) or not all(isinstance(k, str) for k in d):
            raise WireError("a golden input must map input names to {dtype, shape, b64}")
        return cls(tuple(GoldenTensor.from_wire(k, v) for k, v in d.items()))


class EventState(StrEnum):
    """What a device reports about one manifest.

        downloading -> applying -> trial -> healthy | rolled_back
        failed | rejected    at any step
        waiting              the device cannot go on for now for a reason of its own (too
                             little disk space) and goes on by itself later; not a failure,
                             no attempt used

    How each report moves the device's rollout target is the server's table
    (``deltafleet.server.rollout.states.TARGET_TRANSITIONS``).
    """

    DOWNLOADING = "downloading"
    APPLYING = "applying"
    TRIAL = "trial"
    HEALTHY = "healthy"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    REJECTED = "rejected"
    WAITING = "waiting"
