"""Wire messages: frozen, slotted dataclasses with explicit to_wire()/from_wire().

Every message carries ``v`` (its format version). ``from_wire`` checks every field's type and
raises WireError on anything else, so a handler never sees a half-valid message.

Manifest (server -> device, signed): the desired state of one model on one device.
Hello, Event, ChunkRequest, Status, Telemetry (device -> server): unsigned JSON.
Portrait, BenchResult (device -> server) and BenchRequest (server -> device, signed): device
portraits and on-device benchmarks (docs/portraits.md).
Ack (server -> device): the event ids the server has durably recorded; the outbox deletes
only those.

The model contract inside a manifest (``health_policy``, ``io_signature``, ``golden_inputs``)
travels as the plain dicts below; their typed forms and rules are in :mod:`.contracts`
(``Manifest.health()``, ``.io()`` and ``.golden()`` give them). Event states are
:class:`~.contracts.EventState`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .canonical import canonical_json, parse_json_object
from .contracts import EventState, GoldenInput, HealthPolicy, IoSignature
from .errors import WireError
from .hashing import chunk_count, is_sha256
from .topics import check_device_id

WIRE_VERSION = 1
MAX_CHUNK_SIZE_BYTES = 1 << 20
MODEL_FORMATS = ("onnx", "tflite", "ptl")
ARTIFACT_KINDS = ("full", "delta")


def _get(d: dict[str, Any], key: str, kind: type | tuple[type, ...], *, optional: bool = False):
    if key not in d or d[key] is None:
        if optional:
            return None
        raise WireError(f"missing field {key!r}")
    value = d[key]
    if isinstance(value, bool) and kind is not bool and not (
        isinstance(kind, tuple) and bool in kind
    ):
        raise WireError(f"field {key!r} has the wrong type")
    if not isinstance(value, kind):
        raise WireError(f"field {key!r} has the wrong type")
    return value


def _sha(d: dict[str, Any], key: str, *, optional: bool = False) -> str | None:
    value = _get(d, key, str, optional=optional)
    if value is not None and not is_sha256(value):
        raise WireError(f"field {key!r} is not a lowercase hex sha256")
    return value


def _nonneg(d: dict[str, Any], key: str) -> int:
    value = _get(d, key, int)
    if value < 0:
        raise WireError(f"field {key!r} is negative")
    return value


def _int_map(d: dict[str, Any], key: str) -> dict[str, int]:
    value = _get(d, key, dict, optional=True) or {}
    if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
               for k, v in value.items()):
        raise WireError(f"field {key!r} must map names to integers")
    return value


def _check_version(d: dict[str, Any]) -> None:
    if d.get("v") != WIRE_VERSION:
        raise WireError(f"unsupported message version {d.get('v')!r}")


@dataclass(frozen=True, slots=True)
class ArtifactRef:
    """What travels: the full model or a delta from ``base_sha256``, cut into chunks."""

    kind: str  # "full" | "delta"
    codec: str  # full: "identity" | "zstd"; delta: "bsdiff4" | "zstd-dict" | "tensor-xor"
    sha256: str
    size_bytes: int
    chunk_size_bytes: int
    chunks: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        d["chunks"] = list(self.chunks)
        return d

    @classmethod
    def from_wire(cls, d: Any) -> ArtifactRef:
        if not isinstance(d, dict):
            raise WireError("artifact must be an object")
        kind = _get(d, "kind", str)
        codec = _get(d, "codec", str)
        if kind not in ARTIFACT_KINDS:
            raise WireError(f"unknown artifact kind {kind!r}")
        chunk_size = _nonneg(d, "chunk_size_bytes")
        size = _nonneg(d, "size_bytes")
        if not 0 < chunk_size <= MAX_CHUNK_SIZE_BYTES:
            raise WireError(f"chunk size {chunk_size} out of range")
        chunks = _get(d, "chunks", list)
        if len(chunks) != chunk_count(size, chunk_size) or not all(map(is_sha256, chunks)):
            raise WireError("chunk list does not match the artifact size")
        return cls(kind, codec, _sha(d, "sha256"), size, chunk_size, tuple(chunks))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Manifest:
    """Signed desired state for one model on one device."""

    manifest_id: str
    device_id: str
    serial: int  # strictly increasing per device
    issued_at: int  # unix seconds
    expires_at: int  # unix seconds
    rollout_id: int | None
    model: str
    version: str
    variant: str
    format: str  # "onnx" | "tflite" | "ptl"
    target_sha256: str
    target_size_bytes: int
    base_sha256: str | None
    artifact: ArtifactRef
    trial_window_s: int = 0  # health window after the swap before the device reports healthy
    health_policy: dict[str, int] = field(default_factory=dict)  # e.g. max_error_rate_ppm
    # Optional IO contract: {"inputs": [{"name", "dtype", "shape"}], "outputs": [...]}, shape
    # entries are ints or null (dynamic). A model whose IO differs from the running one is
    # refused unless ``allow_io_change``.
    io_signature: dict[str, Any] | None = None
    allow_io_change: bool = False
    # Optional golden inputs for warm-up and trial probes: a list of {input name:
    # {"dtype": "float32", "shape": [1, 64], "b64": base64 of the C-order bytes}}.
    golden_inputs: tuple[dict[str, Any], ...] = ()
    # Optional hardware binding: the device's hardware id (its /etc/machine-id or configured
    # ``hardware_id``) as reported in its hello; a device with another id refuses the manifest.
    hardware_id: str | None = None

    _OPTIONAL = ("io_signature", "allow_io_change", "golden_inputs", "hardware_id")

    def to_wire(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__
             if k != "artifact" and k not in self._OPTIONAL}
        d["health_policy"] = dict(self.health_policy)
        # Optional fields travel only when set, so older agents and signatures are unaffected.
        if self.io_signature is not None:
            d["io_signature"] = self.io_signature
        if self.allow_io_change:
            d["allow_io_change"] = True
        if self.golden_inputs:
            d["golden_inputs"] = list(self.golden_inputs)
        if self.hardware_id is not None:
            d["hardware_id"] = self.hardware_id
        d["artifact"] = self.artifact.to_wire()
        d["v"] = WIRE_VERSION
        d["type"] = "manifest"
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Manifest:
        _check_version(d)
        if d.get("type") != "manifest":
            raise WireError("payload is not a manifest")
        fmt = _get(d, "format", str)
        if fmt not in MODEL_FORMATS:
            raise WireError(f"unknown model format {fmt!r}")
        artifact = ArtifactRef.from_wire(d.get("artifact"))
        base = _sha(d, "base_sha256", optional=True)
        if artifact.kind == "delta" and base is None:
            raise WireError("a delta artifact needs base_sha256")
        return cls(
            manifest_id=_get(d, "manifest_id", str),
            device_id=check_device_id(_get(d, "device_id", str)),
            serial=_nonneg(d, "serial"),
            issued_at=_nonneg(d, "issued_at"),
            expires_at=_nonneg(d, "expires_at"),
            rollout_id=_get(d, "rollout_id", int, optional=True),
            model=_get(d, "model", str),
            version=_get(d, "version", str),
            variant=_get(d, "variant", str),
            format=fmt,
            target_sha256=_sha(d, "target_sha256"),  # type: ignore[arg-type]
            target_size_bytes=_nonneg(d, "target_size_bytes"),
            base_sha256=base,
            artifact=artifact,
            trial_window_s=_get(d, "trial_window_s", int, optional=True) or 0,
            health_policy=_int_map(d, "health_policy"),
            io_signature=_io_signature(d),
            allow_io_change=bool(_get(d, "allow_io_change", bool, optional=True)),
            golden_inputs=_golden(d),
            hardware_id=_hardware_id(d),
        )

    def health(self, defaults: HealthPolicy | None = None) -> HealthPolicy:
        """The trial bar: ``health_policy`` read the device's way (missing keys: ``defaults``)."""
        return HealthPolicy.from_manifest(self.health_policy, defaults)

    def io(self) -> IoSignature | None:
        """The signed IO contract, if the manifest carries one."""
        return None if self.io_signature is None else IoSignature.from_wire(self.io_signature)

    def golden(self) -> tuple[GoldenInput, ...]:
        """The golden inputs, decoded and checked (WireError on bad base64 or sizes)."""
        return tuple(GoldenInput.from_wire(g) for g in self.golden_inputs)


MAX_HARDWARE_ID_CHARS = 128  # the server stores at most this many characters


def _hardware_id(d: dict[str, Any]) -> str | None:
    value = _get(d, "hardware_id", str, optional=True)
    if value is not None and len(value) > MAX_HARDWARE_ID_CHARS:
        raise WireError(f"field 'hardware_id' is over {MAX_HARDWARE_ID_CHARS} characters")
    return value or None


def _io_signature(d: dict[str, Any]) -> dict[str, Any] | None:
    sig = _get(d, "io_signature", dict, optional=True)
    if sig is not None:
        IoSignature.from_wire(sig)
    return sig


def _golden(d: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    items = _get(d, "golden_inputs", list, optional=True) or []
    for item in items:
        if not isinstance(item, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("dtype"), str)
            and isinstance(v.get("shape"), list) and isinstance(v.get("b64"), str)
            for k, v in item.items()
        ):
            raise WireError("golden_inputs must be a list of {input: {dtype, shape, b64}}")
    return tuple(items)


@dataclass(frozen=True, slots=True)
class ModelState:
    """One model a device runs."""

    model: str
    version: str
    sha256: str
    variant: str = "default"
    format: str = "onnx"

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: Any) -> ModelState:
        if not isinstance(d, dict):
            raise WireError("model entry must be an object")
        return cls(
            model=_get(d, "model", str),
            version=_get(d, "version", str),
            sha256=_sha(d, "sha256"),  # type: ignore[arg-type]
            variant=_get(d, "variant", str, optional=True) or "default",
            format=_get(d, "format", str, optional=True) or "onnx",
        )


@dataclass(frozen=True, slots=True)
class Hello:
    """Sent on every connect: who the device is, what it can run, and what it runs now."""

    device_id: str
    agent_version: str
    profile: dict[str, Any]  # arch, os, cpu, memory_bytes, accelerator, runtimes, disk_free_bytes
    labels: dict[str, str]
    models: tuple[ModelState, ...]
    sent_at: int = field(default_factory=lambda: int(time.time()))

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": WIRE_VERSION,
            "type": "hello",
            "device_id": self.device_id,
            "agent_version": self.agent_version,
            "profile": self.profile,
            "labels": self.labels,
            "models": [m.to_wire() for m in self.models],
            "sent_at": self.sent_at,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Hello:
        _check_version(d)
        labels = _get(d, "labels", dict)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise WireError("labels must map strings to strings")
        return cls(
            device_id=check_device_id(_get(d, "device_id", str)),
            agent_version=_get(d, "agent_version", str),
            profile=_get(d, "profile", dict),
            labels=labels,
            models=tuple(ModelState.from_wire(m) for m in _get(d, "models", list)),
            sent_at=_nonneg(d, "sent_at"),
        )


EVENT_STATES = tuple(EventState)  # the states and their order: see EventState
# What an event's unknown version (None) is on the wire: a message with the version of a
# manifest it could not read. Servers before typed events require a string here.
UNKNOWN_VERSION = "?"


@dataclass(frozen=True, slots=True)
class Event:
    """Progress or result of applying one manifest. ``event_id`` makes delivery idempotent.
    ``version`` is None when the device could not read the manifest (``"?"`` on the wire)."""

    event_id: str
    device_id: str
    manifest_id: str | None
    rollout_id: int | None
    model: str
    version: str | None
    state: EventState
    reason: str = ""
    sha256: str | None = None  # sha the device runs after this event
    bytes_received: int = 0
    chunks_total: int = 0
    chunks_reused: int = 0  # chunks found on disk from an earlier attempt
    health: dict[str, int] = field(default_factory=dict)  # trial figures, e.g. p95_us, errors
    at: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", EventState(self.state))
        if self.version == UNKNOWN_VERSION:
            object.__setattr__(self, "version", None)

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        d["version"] = UNKNOWN_VERSION if self.version is None else self.version
        d["v"] = WIRE_VERSION
        d["type"] = "event"
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Event:
        _check_version(d)
        state = _get(d, "state", str)
        if state not in EVENT_STATES:
            raise WireError(f"unknown event state {state!r}")
        version = _get(d, "version", str)
        return cls(
            event_id=_get(d, "event_id", str),
            device_id=check_device_id(_get(d, "device_id", str)),
            manifest_id=_get(d, "manifest_id", str, optional=True),
            rollout_id=_get(d, "rollout_id", int, optional=True),
            model=_get(d, "model", str),
            version=None if version == UNKNOWN_VERSION else version,
            state=EventState(state),
            reason=_get(d, "reason", str, optional=True) or "",
            sha256=_sha(d, "sha256", optional=True),
            bytes_received=_nonneg(d, "bytes_received"),
            chunks_total=_nonneg(d, "chunks_total"),
            chunks_reused=_nonneg(d, "chunks_reused"),
            health=_int_map(d, "health"),
            at=_nonneg(d, "at"),
        )


MAX_INDICES_PER_REQUEST = 4096


@dataclass(frozen=True, slots=True)
class ChunkRequest:
    device_id: str
    artifact_sha256: str
    indices: tuple[int, ...]
    repair: bool = False  # these chunks arrived and failed their hash: send them again

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": WIRE_VERSION,
            "type": "chunkreq",
            "device_id": self.device_id,
            "artifact_sha256": self.artifact_sha256,
            "indices": list(self.indices),
            **({"repair": True} if self.repair else {}),
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> ChunkRequest:
        _check_version(d)
        indices = _get(d, "indices", list)
        if len(indices) > MAX_INDICES_PER_REQUEST or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices
        ):
            raise WireError("indices must be a list of non-negative integers")
        return cls(
            device_id=check_device_id(_get(d, "device_id", str)),
            artifact_sha256=_sha(d, "artifact_sha256"),  # type: ignore[arg-type]
            indices=tuple(indices),
            repair=bool(_get(d, "repair", bool, optional=True)),
        )


@dataclass(frozen=True, slots=True)
class Status:
    """Retained presence; the last will publishes ``online=False``."""

    device_id: str
    online: bool

    def to_wire(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, "type": "status", "device_id": self.device_id,
                "online": self.online}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Status:
        _check_version(d)
        return cls(check_device_id(_get(d, "device_id", str)), _get(d, "online", bool))


MAX_EVENT_ID_CHARS = 64  # the server stores event ids in a 64-character column

# Telemetry (device -> server, through the outbox; see docs/protocol.md and docs/observability.md)
# Latency bucket upper bounds in microseconds; a model's ``latency_buckets`` holds one count per
# bound plus one for +Inf, each the answers in (previous bound, bound] (not cumulative).
TELEMETRY_LATENCY_BOUNDS_US = (500, 1000, 2500, 5000, 10_000, 25_000, 50_000, 100_000, 250_000,
                               500_000, 1_000_000, 2_500_000)
MAX_TELEMETRY_MODELS = 16  # (model, version) entries in one summary
MAX_TELEMETRY_BYTES = 8 * 1024
TELEMETRY_COUNTERS = ("requests", "errors", "fallbacks", "swaps", "trials_passed",
                      "trials_failed", "agreement_ppm_sum", "agreement_trials", "latency_sum_us")


@dataclass(frozen=True, slots=True)
class ModelTelemetry:
    """Inference figures of one served (model, version) since the agent started (cumulative).

    ``requests`` counts every predict that reached the model slot; ``errors`` those the primary
    did not answer (a fallback may have); ``fallbacks`` the answers the fallback model gave;
    ``latency_buckets`` the answered requests by latency. ``version`` is "" for answers while
    no primary was ever loaded."""

    model: str
    version: str
    variant: str = ""
    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    swaps: int = 0
    trials_passed: int = 0
    trials_failed: int = 0
    # output agreement of the new version with the previous one in its trials (ppm, summed
    # over ``agreement_trials`` trials; see agent/latency.output_agreement)
    agreement_ppm_sum: int = 0
    agreement_trials: int = 0
    latency_sum_us: int = 0
    latency_buckets: tuple[int, ...] = (0,) * (len(TELEMETRY_LATENCY_BOUNDS_US) + 1)

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        d["latency_buckets"] = list(self.latency_buckets)
        return d

    @classmethod
    def from_wire(cls, d: Any) -> ModelTelemetry:
        if not isinstance(d, dict):
            raise WireError("a telemetry model entry must be an object")
        buckets = _get(d, "latency_buckets", list)
        if len(buckets) != len(TELEMETRY_LATENCY_BOUNDS_US) + 1 or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in buckets):
            raise WireError(f"latency_buckets must be {len(TELEMETRY_LATENCY_BOUNDS_US) + 1} "
                            "non-negative integers")
        m = cls(model=_get(d, "model", str), version=_get(d, "version", str),
                variant=_get(d, "variant", str, optional=True) or "",
                **{k: _nonneg(d, k) for k in TELEMETRY_COUNTERS},
                latency_buckets=tuple(buckets))
        if m.errors > m.requests or m.fallbacks > m.requests or sum(buckets) > m.requests:
            raise WireError(f"telemetry of {m.model}: errors, fallbacks and answered requests "
                            "cannot exceed requests")
        return m


@dataclass(frozen=True, slots=True)
class Telemetry:
    """Periodic summary of a device's inference (``models``) and its memory; counters are
    cumulative since the agent process started (``boot_id``), ``seq`` counts summaries of that
    boot. ``telemetry_id`` is acked like an event id (the outbox keeps only the latest)."""

    telemetry_id: str
    device_id: str
    boot_id: str
    seq: int
    sent_at: int
    uptime_s: int
    rss_bytes: int
    models: tuple[ModelTelemetry, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, "type": "telemetry", "telemetry_id": self.telemetry_id,
                "device_id": self.device_id, "boot_id": self.boot_id, "seq": self.seq,
                "sent_at": self.sent_at, "uptime_s": self.uptime_s,
                "rss_bytes": self.rss_bytes, "models": [m.to_wire() for m in self.models]}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Telemetry:
        _check_version(d)
        if d.get("type") != "telemetry":
            raise WireError("payload is not telemetry")
        tid = _get(d, "telemetry_id", str)
        boot = _get(d, "boot_id", str)
        if not 0 < len(tid) <= MAX_EVENT_ID_CHARS or not 0 < len(boot) <= 32:
            raise WireError("telemetry_id must be 1-64 characters and boot_id 1-32")
        models = _get(d, "models", list)
        if len(models) > MAX_TELEMETRY_MODELS:
            raise WireError(f"telemetry lists {len(models)} models, over {MAX_TELEMETRY_MODELS}")
        entries = tuple(ModelTelemetry.from_wire(m) for m in models)
        if len({(m.model, m.version) for m in entries}) != len(entries):
            raise WireError("telemetry lists a (model, version) twice")
        return cls(telemetry_id=tid, device_id=check_device_id(_get(d, "device_id", str)),
                   boot_id=boot, seq=_nonneg(d, "seq"), sent_at=_nonneg(d, "sent_at"),
                   uptime_s=_nonneg(d, "uptime_s"), rss_bytes=_nonneg(d, "rss_bytes"),
                   models=entries)


MAX_ACK_IDS = 1000  # event ids in one ack; a larger batch goes out as several acks
MAX_ACK_BYTES = 96 * 1024  # a full ack (1000 ids of 64 characters) is ~68 KiB


@dataclass(frozen=True, slots=True)
class Ack:
    """Server -> device, after the database commit: these event ids are recorded (first
    delivery or duplicate alike), so the device may delete them from its outbox."""

    device_id: str
    event_ids: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, "type": "ack", "device_id": self.device_id,
                "event_ids": list(self.event_ids)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Ack:
        _check_version(d)
        if d.get("type") != "ack":
            raise WireError("payload is not an ack")
        ids = _get(d, "event_ids", list)
        if len(ids) > MAX_ACK_IDS:
            raise WireError(f"an ack carries at most {MAX_ACK_IDS} event ids, got {len(ids)}")
        if not all(isinstance(i, str) and 0 < len(i) <= MAX_EVENT_ID_CHARS for i in ids):
            raise WireError(f"event ids must be strings of 1-{MAX_EVENT_ID_CHARS} characters")
        return cls(check_device_id(_get(d, "device_id", str)), tuple(ids))


MAX_PORTRAIT_BYTES = 16 * 1024  # a portrait's JSON; the server checks every field
MAX_BENCH_VARIANTS = 8
MAX_BENCH_RUNS = 2000


@dataclass(frozen=True, slots=True)
class Portrait:
    """Device -> server after each hello: what the device can actually use (providers that
    opened a session, delegates, runtime versions, memory/disk headroom, power sensors; see
    ``agent.portrait``). The shape is checked here, every field by the server's guard."""

    device_id: str
    portrait: dict[str, Any]
    sent_at: int = field(default_factory=lambda: int(time.time()))

    def to_wire(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, "type": "portrait", "device_id": self.device_id,
                "portrait": self.portrait, "sent_at": self.sent_at}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Portrait:
        _check_version(d)
        if d.get("type") != "portrait":
            raise WireError("payload is not a portrait")
        portrait = _get(d, "portrait", dict)
        if len(canonical_json(portrait)) > MAX_PORTRAIT_BYTES:
            raise WireError(f"portrait over {MAX_PORTRAIT_BYTES} bytes")
        return cls(check_device_id(_get(d, "device_id", str)), portrait, _nonneg(d, "sent_at"))


@dataclass(frozen=True, slots=True)
class BenchVariant:
    """One candidate to benchmark: the model file by sha256 (on disk, or fetched as the
    chunks of ``artifact``, the full identity artifact)."""

    name: str
    sha256: str
    format: str
    size_bytes: int
    artifact: ArtifactRef | None = None

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "sha256": self.sha256, "format": self.format,
                             "size_bytes": self.size_bytes}
        if self.artifact is not None:
            d["artifact"] = self.artifact.to_wire()
        return d

    @classmethod
    def from_wire(cls, d: Any) -> BenchVariant:
        if not isinstance(d, dict):
            raise WireError("bench variant must be an object")
        fmt = _get(d, "format", str)
        if fmt not in MODEL_FORMATS:
            raise WireError(f"unknown model format {fmt!r}")
        art = d.get("artifact")
        artifact = None if art is None else ArtifactRef.from_wire(art)
        sha = _sha(d, "sha256")
        if artifact is not None and (artifact.kind != "full" or artifact.sha256 != sha
                                     or artifact.codec != "identity"):
            raise WireError("a bench artifact must be the model file itself (full, identity)")
        name = _get(d, "name", str)
        if not 0 < len(name) <= 64:
            raise WireError("bench variant names are 1-64 characters")
        return cls(name, sha, fmt, _nonneg(d, "size_bytes"), artifact)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """Server -> device (signed like manifests, retained on ``benchreq``): benchmark these
    variants off the request path and report a ``BenchResult`` per variant."""

    request_id: str
    device_id: str
    issued_at: int
    expires_at: int
    variants: tuple[BenchVariant, ...]
    runs: int = 50
    warmup: int = 5
    golden_inputs: tuple[dict[str, Any], ...] = ()

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "v": WIRE_VERSION, "type": "benchreq", "request_id": self.request_id,
            "device_id": self.device_id, "issued_at": self.issued_at,
            "expires_at": self.expires_at, "variants": [v.to_wire() for v in self.variants],
            "runs": self.runs, "warmup": self.warmup}
        if self.golden_inputs:
            d["golden_inputs"] = list(self.golden_inputs)
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> BenchRequest:
        _check_version(d)
        if d.get("type") != "benchreq":
            raise WireError("payload is not a bench request")
        variants = _get(d, "variants", list)
        if not 0 < len(variants) <= MAX_BENCH_VARIANTS:
            raise WireError(f"a bench request names 1-{MAX_BENCH_VARIANTS} variants")
        runs, warmup = _nonneg(d, "runs"), _nonneg(d, "warmup")
        if not 0 < runs <= MAX_BENCH_RUNS or warmup > MAX_BENCH_RUNS:
            raise WireError(f"runs must be 1-{MAX_BENCH_RUNS}")
        rid = _get(d, "request_id", str)
        if not 0 < len(rid) <= MAX_EVENT_ID_CHARS - 8:
            raise WireError("bad request id")
        return cls(rid, check_device_id(_get(d, "device_id", str)), _nonneg(d, "issued_at"),
                   _nonneg(d, "expires_at"), tuple(BenchVariant.from_wire(v) for v in variants),
                   runs, warmup, _golden(d))


BENCH_FIGURES = ("load_ms", "p50_us", "p95_us", "peak_rss_bytes", "model_rss_bytes",
                 "energy_uj_per_inference", "runs")


@dataclass(frozen=True, slots=True)
class BenchResult:
    """Device -> server through the outbox (``result_id`` is its stable id, acked like an
    event's): one variant's figures, or ``error`` when it could not be measured."""

    result_id: str
    device_id: str
    request_id: str
    variant: str
    sha256: str
    runtime: str
    runtime_version: str
    figures: dict[str, int]  # BENCH_FIGURES; energy only where RAPL is readable
    error: str = ""
    at: int = field(default_factory=lambda: int(time.time()))

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(v=WIRE_VERSION, type="bench")
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> BenchResult:
        _check_version(d)
        if d.get("type") != "bench":
            raise WireError("payload is not a bench result")
        figures = _int_map(d, "figures")
        if set(figures) - set(BENCH_FIGURES) or any(v < 0 for v in figures.values()):
            raise WireError(f"bench figures are non-negative {', '.join(BENCH_FIGURES)}")
        texts = {k: _get(d, k, str) for k in ("result_id", "request_id", "variant", "runtime",
                                              "runtime_version")}
        if not 0 < len(texts["result_id"]) <= MAX_EVENT_ID_CHARS or any(
                len(v) > 64 for v in texts.values()):
            raise WireError("bench result text fields are at most 64 characters")
        return cls(texts["result_id"], check_device_id(_get(d, "device_id", str)),
                   texts["request_id"], texts["variant"], _sha(d, "sha256"),  # type: ignore[arg-type]
                   texts["runtime"], texts["runtime_version"], figures,
                   (_get(d, "error", str, optional=True) or "")[:500], _nonneg(d, "at"))


def encode(message: Hello | Event | ChunkRequest | Status | Manifest | Ack | Telemetry
           | Portrait | BenchRequest | BenchResult) -> bytes:
    return canonical_json(message.to_wire())


def decode(cls, data: bytes, *, max_bytes: int = 256 * 1024):
    """Parse ``data`` as message class ``cls``; raises WireError on anything malformed."""
    return cls.from_wire(parse_json_object(data, max_bytes=max_bytes))
