"""Device telemetry into the store: the latest summary per device and inference totals per
device, model and version that only ever grow.

A summary's counters are cumulative since the agent started (its ``boot_id``). The server
keeps the last summary's raw counters (``DeviceTelemetry.last``) and adds to the totals
(``DeviceTelemetryModel``) only the difference to them; a new boot starts from zero. So a
restarted agent does not lower the fleet sums (Prometheus would read a drop as a counter
reset), a summary sent twice (the outbox is at-least-once) adds nothing (same boot, ``seq``
not newer), and an entry the agent dropped from its bounded summary keeps what it added.

A summary carries only the entries that changed since the last one the server acknowledged;
an entry not in it keeps its last counters here (``last`` carries it forward, at most
``LAST_ENTRIES`` per device). An entry whose counters went down within one boot was evicted
from the agent's table and started again from zero: its counters are all new.

The device's row is read ``FOR UPDATE`` (PostgreSQL): two replicas applying two summaries of
one device at once take turns instead of both adding the same difference.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy.orm import Session

from deltafleet.shared import Telemetry
from deltafleet.shared.messages import TELEMETRY_COUNTERS

from ..store.models import TELEMETRY_BUCKETS, Device, DeviceTelemetry, DeviceTelemetryModel

BUCKET_COLUMNS = tuple(f"lat_{i}" for i in range(TELEMETRY_BUCKETS))
COLUMNS = (*TELEMETRY_COUNTERS, *BUCKET_COLUMNS)
DEVICE_TYPE_CHARS = 64
LAST_ENTRIES = 64  # entries' last counters kept per device (the agent keeps at most 16)

__all__ = ["COLUMNS", "apply_telemetry", "device_type"]


def device_type(device: Device) -> str:
    """What the fleet metrics call a device's type: its architecture and accelerator
    (``aarch64/cuda``), both from its hello; a bounded set, never a device id."""
    return f"{device.arch or 'unknown'}/{device.accelerator or 'none'}"[:DEVICE_TYPE_CHARS]


def _vector(m: object) -> list[int]:
    return [*(int(getattr(m, k)) for k in TELEMETRY_COUNTERS), *m.latency_buckets]  # type: ignore[attr-defined]


def apply_telemetry(s: Session, messages: Iterable[Telemetry], now: datetime) -> list[Telemetry]:
    """Apply summaries in this transaction; returns the ones to ack (applied, or already
    applied). A summary of a device the server does not know yet (no hello) is not acked:
    the agent sends a newer one later."""
    done: list[Telemetry] = []
    for t in messages:
        device = s.get(Device, t.device_id)
        if device is None:
            continue
        row = s.get(DeviceTelemetry, t.device_id, with_for_update=True)
        same_boot = row is not None and row.boot_id == t.boot_id
        if same_boot and row is not None and t.seq <= row.seq:
            done.append(t)  # a duplicate or an older summary: nothing new in it
            continue
        before = dict(row.last or {}) if same_boot and row is not None else {}
        kind = device_type(device)
        last: dict[str, list[int]] = dict(before)
        for m in t.models:
            key = f"{m.model}\n{m.version}"
            vec = _vector(m)
            old = before.get(key) or [0] * len(vec)
            if any(a < b for a, b in zip(vec, old, strict=False)):
                old = [0] * len(vec)  # evicted on the device and counted again from zero
            delta = [max(0, a - b) for a, b in zip(vec, old, strict=False)]
            last.pop(key, None)
            last[key] = vec  # newest last: the oldest go first past LAST_ENTRIES
            if not any(delta):
                continue
            series = s.get(DeviceTelemetryModel, (t.device_id, m.model, m.version))
            if series is None:
                series = DeviceTelemetryModel(device_id=t.device_id, model_name=m.model,
                                              version=m.version,
                                              **dict.fromkeys(COLUMNS, 0))
                s.add(series)
            for col, d in zip(COLUMNS, delta, strict=True):
                setattr(series, col, (getattr(series, col) or 0) + d)
            series.variant = m.variant
            series.device_type = kind
            series.updated_at = now
        if row is None:
            row = DeviceTelemetry(device_id=t.device_id)
            s.add(row)
        row.boot_id, row.seq, row.device_type = t.boot_id, t.seq, kind
        row.rss_bytes, row.uptime_s, row.sent_at = t.rss_bytes, t.uptime_s, t.sent_at
        row.received_at, row.last = now, dict(list(last.items())[-LAST_ENTRIES:])
        done.append(t)
    return done
