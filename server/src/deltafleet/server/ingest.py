"""Store fit: may a parsed device message be written to the database as it is?

The wire parsers (``deltafleet.shared.messages``) check shapes and types; this pure check
(no I/O) adds what the store needs before any write, so that a device message either lands
whole or is refused alone with a one-line reason, never half-written and never crashing the
server:

- text is encodable (no lone UTF-16 surrogate, which SQLite's and psycopg's UTF-8 encoders
  raise on) and has no NUL (PostgreSQL text cannot hold one), anywhere in the message,
  including keys and nested profile values;
- a value stored in a sized column fits it, with the limit read from the model's column
  (``Device.cpu`` is ``String(128)``: 128 characters), never a copy of the number; ids are
  refused when too long, never cut (two ids sharing their first 64 characters would collide);
- profile fields have the type their column holds (text or null, a non-negative integer or
  null); integers fit a signed 64-bit column;
- JSON the message carries is bounded in depth and size.

``fits_store`` raises ``UnstorableMessage`` (a ``WireError``) and nothing else.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import Column, String

from deltafleet.shared import ChunkRequest, Event, Hello, Status, Telemetry, WireError
from deltafleet.shared.messages import TELEMETRY_COUNTERS

from .store.models import Device, DeviceEvent, DeviceModel, RolloutTarget, Variant

INT64_MAX = 2**63 - 1
MAX_REASON_CHARS = 4096  # rollout_targets.reason is TEXT: bounded here, generously
MAX_LABEL_CHARS = 256  # label names and values (devices.labels, JSON)
MAX_RUNTIME_CHARS = 64  # runtime names and versions (devices.runtimes, JSON)
MAX_JSON_TEXT_CHARS = 1024  # any other string inside a profile
MAX_JSON_DEPTH = 4  # profile -> runtimes -> value is depth 2
MAX_JSON_VALUES = 512  # every key, value and list item counted
MAX_LABELS = 256
MAX_MODELS = 256
MAX_HEALTH_FIGURES = 64


class UnstorableMessage(WireError):
    """A well-formed device message holds a value the store cannot keep as it is."""


def column_chars(column: Any) -> int:
    """The character limit of a sized string column (``String(n)``)."""
    col = column.property.columns[0] if hasattr(column, "property") else column
    assert isinstance(col, Column) and isinstance(col.type, String) and col.type.length
    return int(col.type.length)


# Profile fields the server stores, each with the column that holds it.
PROFILE_TEXT = {
    "hardware_id": column_chars(Device.hardware_id),
    "arch": column_chars(Device.arch),
    "os": column_chars(Device.os),
    "cpu": column_chars(Device.cpu),
    "accelerator": column_chars(Device.accelerator),
}
PROFILE_COUNTS = ("memory_bytes", "disk_free_bytes")  # BIGINT columns
AGENT_VERSION_CHARS = column_chars(Device.agent_version)
MODEL_NAME_CHARS = column_chars(DeviceModel.model_name)
MODEL_VERSION_CHARS = column_chars(DeviceModel.version)
MODEL_VARIANT_CHARS = column_chars(DeviceModel.variant)
EVENT_ID_CHARS = column_chars(DeviceEvent.event_id)
MANIFEST_ID_CHARS = column_chars(RolloutTarget.manifest_id)
MODEL_FORMAT_CHARS = column_chars(Variant.format)


def check_text(value: Any, where: str, max_chars: int) -> str:
    """``value`` as storable text of at most ``max_chars`` characters, else UnstorableMessage."""
    if not isinstance(value, str):
        raise UnstorableMessage(f"{where} must be text, not {type(value).__name__}")
    if "\x00" in value:
        raise UnstorableMessage(f"{where} holds a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UnstorableMessage(f"{where} holds unencodable text (a lone surrogate)") from None
    if len(value) > max_chars:
        raise UnstorableMessage(
            f"{where} is {len(value)} characters, over the {max_chars} its column holds")
    return value


def check_int(value: Any, where: str, *, minimum: int = -INT64_MAX - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnstorableMessage(f"{where} must be an integer, not {type(value).__name__}")
    if not minimum <= value <= INT64_MAX:
        raise UnstorableMessage(f"{where} is out of the 64-bit integer range")
    return value


def check_json(value: Any, where: str, *, max_depth: int = MAX_JSON_DEPTH,
               max_values: int = MAX_JSON_VALUES) -> None:
    """Bounded, storable JSON: depth, total size, text, integers, finite numbers."""
    budget = [max_values]

    def walk(v: Any, path: str, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise UnstorableMessage(f"{where} holds more than {max_values} values")
        if v is None or isinstance(v, bool):
            return
        if isinstance(v, str):
            check_text(v, path, MAX_JSON_TEXT_CHARS)
        elif isinstance(v, int):
            check_int(v, path)
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise UnstorableMessage(f"{path} is not a finite number")
        elif isinstance(v, dict | list):
            if depth >= max_depth:
                raise UnstorableMessage(f"{where} is nested deeper than {max_depth} levels")
            if isinstance(v, dict):
                for k, item in v.items():
                    budget[0] -= 1
                    check_text(k, f"a key in {path}", MAX_JSON_TEXT_CHARS)
                    walk(item, f"{path}.{k}", depth + 1)
            else:
                for i, item in enumerate(v):
                    walk(item, f"{path}[{i}]", depth + 1)
        else:
            raise UnstorableMessage(f"{path} is not JSON ({type(v).__name__})")

    walk(value, where, 0)


def _str_map(value: Any, where: str, max_chars: int, max_items: int) -> None:
    if not isinstance(value, dict):
        raise UnstorableMessage(f"{where} must be an object")
    if len(value) > max_items:
        raise UnstorableMessage(f"{where} has {len(value)} entries, over {max_items}")
    for k, v in value.items():
        check_text(k, f"a name in {where}", max_chars)
        check_text(v, f"{where}.{k}", max_chars)


def _hello(h: Hello) -> None:
    check_text(h.agent_version, "agent_version", AGENT_VERSION_CHARS)
    check_int(h.sent_at, "sent_at")
    check_json(h.profile, "profile")
    for key, chars in PROFILE_TEXT.items():
        if h.profile.get(key) is not None:
            check_text(h.profile[key], f"profile.{key}", chars)
    for key in PROFILE_COUNTS:
        if h.profile.get(key) is not None:
            check_int(h.profile[key], f"profile.{key}", minimum=0)
    if h.profile.get("runtimes") is not None:
        _str_map(h.profile["runtimes"], "profile.runtimes", MAX_RUNTIME_CHARS, MAX_JSON_VALUES)
    _str_map(h.labels, "labels", MAX_LABEL_CHARS, MAX_LABELS)
    if len(h.models) > MAX_MODELS:
        raise UnstorableMessage(f"the hello lists {len(h.models)} models, over {MAX_MODELS}")
    for m in h.models:
        check_text(m.model, "a model name", MODEL_NAME_CHARS)
        check_text(m.version, f"the version of model {m.model}", MODEL_VERSION_CHARS)
        check_text(m.variant, f"the variant of model {m.model}", MODEL_VARIANT_CHARS)
        check_text(m.format, f"the format of model {m.model}", MODEL_FORMAT_CHARS)


def _event(e: Event) -> None:
    if not e.event_id:
        raise UnstorableMessage("event_id is empty")
    check_text(e.event_id, "event_id", EVENT_ID_CHARS)
    if e.manifest_id is not None:
        check_text(e.manifest_id, "manifest_id", MANIFEST_ID_CHARS)
    check_text(e.model, "model", MODEL_NAME_CHARS)
    if e.version is not None:
        check_text(e.version, "version", MODEL_VERSION_CHARS)
    check_text(e.reason, "reason", MAX_REASON_CHARS)
    if e.rollout_id is not None:
        check_int(e.rollout_id, "rollout_id")
    for name in ("bytes_received", "chunks_total", "chunks_reused", "at"):
        check_int(getattr(e, name), name, minimum=0)
    if len(e.health) > MAX_HEALTH_FIGURES:
        raise UnstorableMessage(f"health has {len(e.health)} figures, over {MAX_HEALTH_FIGURES}")
    for k, v in e.health.items():
        check_text(k, "a health figure's name", MAX_RUNTIME_CHARS)
        check_int(v, f"health.{k}")


def _telemetry(t: Telemetry) -> None:
    check_text(t.telemetry_id, "telemetry_id", EVENT_ID_CHARS)
    check_text(t.boot_id, "boot_id", 32)
    for name in ("seq", "sent_at", "uptime_s", "rss_bytes"):
        check_int(getattr(t, name), name, minimum=0)
    for m in t.models:
        check_text(m.model, "a model name", MODEL_NAME_CHARS)
        check_text(m.version, f"the version of model {m.model}", MODEL_VERSION_CHARS)
        check_text(m.variant, f"the variant of model {m.model}", MODEL_VARIANT_CHARS)
        for name in TELEMETRY_COUNTERS:
            check_int(getattr(m, name), f"{m.model}.{name}", minimum=0)
        for b in m.latency_buckets:
            check_int(b, f"{m.model}.latency_buckets", minimum=0)


def _chunk_request(r: ChunkRequest) -> None:
    for i in r.indices:
        check_int(i, "a chunk index", minimum=0)


def fits_store(message: Hello | Status | Event | ChunkRequest | Telemetry) -> None:
    """Raise UnstorableMessage unless every field of ``message`` can be stored as it is.

    Device ids and sha256 fields are already checked by the parsers (1-64 safe characters,
    64 lowercase hex digits)."""
    if isinstance(message, Hello):
        _hello(message)
    elif isinstance(message, Event):
        _event(message)
    elif isinstance(message, ChunkRequest):
        _chunk_request(message)
    elif isinstance(message, Telemetry):
        _telemetry(message)
    elif not isinstance(message, Status):
        raise UnstorableMessage(f"not a device message: {type(message).__name__}")


__all__ = ["UnstorableMessage", "check_json", "check_text", "column_chars", "fits_store"]
