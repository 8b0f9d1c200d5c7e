"""Hostile device input: a pure guard the daemon consults before and after parsing.

Every device message is untrusted. The guard (no I/O, no clock of its own) decides:

1. ``admit(device_id, size)`` before parsing: refuse a payload over the size cap (never parse
   it) and messages from a device on the deny list (``enroll.is_revoked``).
2. ``invalid(device_id, reason, kind=...)`` after a parse/validation failure: count it per
   device and per kind (``REFUSAL_KINDS``); over
   ``suspect_threshold`` invalid messages within ``window_s`` the device is marked suspect.
   ``refusals`` counts every refused message by reason (``REFUSAL_REASONS``) for the metrics.
3. ``valid(device_id)`` after a message that validated (only then may the daemon write to
   the database).

A suspect device stays suspect until ``clear(device_id)``; the daemon may keep serving it or
drop its messages (``drop_suspect``). Other devices are never affected. Counters are bounded
(``max_devices``) so a flood of invented device ids cannot grow memory without limit.

``check_portrait`` is the field-by-field check of a device portrait (``PortraitLimits``).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deltafleet.shared import WireError

DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024
# Why a device message was refused (a fixed set, so per-device counters stay bounded):
# oversize       over the payload cap (never parsed)
# malformed      the wire parser refused it (bad JSON, wrong shape or type, another device's id)
# unstorable     it parsed, but a value does not fit the store (ingest.fits_store)
# store_refused  the database refused it when applied alone (the validator let it through)
# error          an unexpected error while handling it (a server bug; logged with a traceback)
REFUSAL_KINDS = ("oversize", "malformed", "unstorable", "store_refused", "error")
# Every reason a message is refused, as counted in ``refusals`` (the metric
# ``deltafleet_device_messages_refused_total{reason}``): the kinds above, plus messages
# refused unread from a revoked device or a suspect one (``drop_suspect``).
REFUSAL_REASONS = (*REFUSAL_KINDS, "revoked", "suspect")


@dataclass(frozen=True, slots=True)
class GuardConfig:
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    suspect_threshold: int = 20  # invalid messages within window_s that make a device suspect
    window_s: float = 600.0
    drop_suspect: bool = False  # True: refuse every message from a suspect device
    max_devices: int = 100_000


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str = ""


@dataclass
class DeviceRecord:
    invalid_total: int = 0
    valid_total: int = 0
    oversize_total: int = 0
    recent: deque[float] = field(default_factory=deque)
    suspect: bool = False
    last_reason: str = ""
    refusals: dict[str, int] = field(default_factory=dict)  # kind (REFUSAL_KINDS) -> count


class DeviceMessageGuard:
    def __init__(self, config: GuardConfig | None = None,
                 is_denied: Callable[[str], bool] | None = None) -> None:
        self.config = config or GuardConfig()
        self._is_denied = is_denied or (lambda _device: False)
        self._devices: OrderedDict[str, DeviceRecord] = OrderedDict()
        self.invalid_total = 0
        self.refused_total = 0
        self.refusals: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)  # this process's

    def _record(self, device_id: str) -> DeviceRecord:
        rec = self._devices.get(device_id)
        if rec is None:
            rec = self._devices[device_id] = DeviceRecord()
            if len(self._devices) > self.config.max_devices:
                self._devices.popitem(last=False)
        else:
            self._devices.move_to_end(device_id)
        return rec

    def admit(self, device_id: str, size_bytes: int, now: float) -> Verdict:
        """Before parsing: may this payload be parsed at all?"""
        if self._is_denied(device_id):
            self.refused_total += 1
            self.refusals["revoked"] += 1
            return Verdict(False, f"device {device_id} is revoked")
        if size_bytes > self.config.max_payload_bytes:
            rec = self._record(device_id)
            rec.oversize_total += 1
            self.invalid(device_id, f"payload of {size_bytes} bytes over the "
                         f"{self.config.max_payload_bytes}-byte cap", now, kind="oversize")
            self.refused_total += 1
            return Verdict(False, "payload too large")
        known = self._devices.get(device_id)
        if known is not None and known.suspect and self.config.drop_suspect:
            self.refused_total += 1
            self.refusals["suspect"] += 1
            return Verdict(False, f"device {device_id} is suspect")
        return Verdict(True)

    def invalid(self, device_id: str, reason: str, now: float, *, kind: str = "malformed") -> bool:
        """Count one invalid message; returns True if this made the device suspect."""
        if kind not in REFUSAL_KINDS:
            # a caller's bug, not bad input: stays builtin (test_error_root)
            raise ValueError(f"unknown refusal kind {kind!r}")
        self.invalid_total += 1
        self.refusals[kind] += 1
        rec = self._record(device_id)
        rec.invalid_total += 1
        rec.last_reason = reason[:200]
        rec.refusals[kind] = rec.refusals.get(kind, 0) + 1
        rec.recent.append(now)
        while rec.recent and rec.recent[0] < now - self.config.window_s:
            rec.recent.popleft()
        if not rec.suspect and len(rec.recent) >= self.config.suspect_threshold:
            rec.suspect = True
            return True
        return False

    def valid(self, device_id: str) -> None:
        self._record(device_id).valid_total += 1

    def is_suspect(self, device_id: str) -> bool:
        rec = self._devices.get(device_id)
        return rec is not None and rec.suspect

    def suspect_count(self) -> int:
        return sum(1 for r in self._devices.values() if r.suspect)

    def suspects(self) -> list[str]:
        return sorted(d for d, r in self._devices.items() if r.suspect)

    def clear(self, device_id: str) -> None:
        self._devices.pop(device_id, None)

    def snapshot(self, device_id: str) -> DeviceRecord | None:
        return self._devices.get(device_id)


# -- portraits (docs/portraits.md): every field checked, every size bounded -------------------
@dataclass(frozen=True, slots=True)
class PortraitLimits:
    max_items: int = 16  # providers, ep_devices, delegates, power sensors, cpu flags
    max_text: int = 120  # any string
    max_runtimes: int = 8


PORTRAIT_LIMITS = PortraitLimits()
_INT64 = 2**63 - 1


def _p_text(value: Any, where: str, limits: PortraitLimits, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > limits.max_text or "\x00" in value:
        raise WireError(f"portrait {where}: text of at most {limits.max_text} characters")
    try:
        value.encode()
    except UnicodeEncodeError as e:
        raise WireError(f"portrait {where}: not encodable text") from e
    return value


def _p_int(value: Any, where: str, *, optional: bool = True) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT64:
        raise WireError(f"portrait {where}: a non-negative integer")
    return value


def _p_list(value: Any, where: str, limits: PortraitLimits) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > limits.max_items:
        raise WireError(f"portrait {where}: a list of at most {limits.max_items} items")
    return value


def _p_obj(value: Any, where: str, keys: dict[str, str], limits: PortraitLimits) -> dict[str, Any]:
    """``keys``: name -> "text" | "text?" | "int" | "bool"; unknown keys are refused."""
    if not isinstance(value, dict):
        raise WireError(f"portrait {where}: an object")
    unknown = set(value) - set(keys)
    if unknown:
        raise WireError(f"portrait {where}: unknown field {sorted(unknown)[0][:40]!r}")
    out: dict[str, Any] = {}
    for k, kind in keys.items():
        v = value.get(k)
        if kind == "bool":
            if not isinstance(v, bool):
                raise WireError(f"portrait {where}.{k}: true or false")
            out[k] = v
        elif kind == "int":
            out[k] = _p_int(v, f"{where}.{k}")
        else:
            out[k] = _p_text(v, f"{where}.{k}", limits, optional=kind == "text?")
    return out


PORTRAIT_FIELDS = ("runtimes", "providers", "ep_devices", "delegates", "accelerators", "cpu",
                   "memory", "disk", "power", "python", "pointer_bits")


def check_portrait(doc: Any, limits: PortraitLimits = PORTRAIT_LIMITS) -> dict[str, Any]:
    """The portrait as the store keeps it, every field checked; WireError on the first bad
    one (the message is then refused alone, like any malformed device message)."""
    if not isinstance(doc, dict):
        raise WireError("portrait: an object")
    unknown = set(doc) - set(PORTRAIT_FIELDS)
    if unknown:
        raise WireError(f"portrait: unknown field {sorted(unknown)[0][:40]!r}")
    runtimes = doc.get("runtimes") or {}
    if not isinstance(runtimes, dict) or len(runtimes) > limits.max_runtimes:
        raise WireError(f"portrait runtimes: at most {limits.max_runtimes} name -> version")
    entry = {"runtime": "text", "name": "text", "ok": "bool", "error": "text?"}
    out: dict[str, Any] = {
        "runtimes": {_p_text(k, "runtimes", limits): _p_text(v, "runtimes", limits)
                     for k, v in runtimes.items()},
        "providers": [_p_obj(p, "providers[]", entry, limits)
                      for p in _p_list(doc.get("providers"), "providers", limits)],
        "ep_devices": [_p_obj(p, "ep_devices[]", {"ep": "text", "type": "text", "vendor": "text"},
                              limits)
                       for p in _p_list(doc.get("ep_devices"), "ep_devices", limits)],
        "delegates": [_p_obj(p, "delegates[]", entry, limits)
                      for p in _p_list(doc.get("delegates"), "delegates", limits)],
        "accelerators": [_p_text(a, "accelerators[]", limits)
                         for a in _p_list(doc.get("accelerators"), "accelerators", limits)],
        "power": [_p_obj(p, "power[]", {"kind": "text", "name": "text", "energy_uj": "int",
                                        "power_uw": "int"}, limits)
                  for p in _p_list(doc.get("power"), "power", limits)],
        "python": _p_text(doc.get("python"), "python", limits, optional=True),
        "pointer_bits": _p_int(doc.get("pointer_bits"), "pointer_bits"),
    }
    cpu = doc.get("cpu") or {}
    if not isinstance(cpu, dict) or set(cpu) - {"count", "model", "flags"}:
        raise WireError("portrait cpu: {count, model, flags}")
    out["cpu"] = {"count": _p_int(cpu.get("count"), "cpu.count"),
                  "model": _p_text(cpu.get("model"), "cpu.model", limits, optional=True),
                  "flags": [_p_text(f, "cpu.flags[]", limits)
                            for f in _p_list(cpu.get("flags"), "cpu.flags", limits)]}
    out["memory"] = _p_obj(doc.get("memory") or {}, "memory",
                           {"total_bytes": "int", "available_bytes": "int",
                            "cgroup_headroom_bytes": "int"}, limits)
    out["disk"] = _p_obj(doc.get("disk") or {}, "disk",
                         {"free_bytes": "int", "total_bytes": "int"}, limits)
    return out


def check_bench_result(result: Any, limits: PortraitLimits = PORTRAIT_LIMITS) -> None:
    """A parsed ``BenchResult`` the store can hold: its texts are storable (lengths and
    figures are bounded by the parser), its figures fit a signed 64-bit column."""
    for name in ("result_id", "request_id", "variant", "runtime", "runtime_version"):
        _p_text(getattr(result, name), f"bench {name}", limits)
    _p_text(result.error, "bench error", PortraitLimits(max_text=500))
    for k, v in result.figures.items():
        _p_int(v, f"bench figures.{k}", optional=False)


__all__ = ["DEFAULT_MAX_PAYLOAD_BYTES", "PORTRAIT_LIMITS", "REFUSAL_KINDS", "REFUSAL_REASONS",
           "DeviceMessageGuard", "GuardConfig", "PortraitLimits", "Verdict", "check_bench_result",
           "check_portrait"]
